"""`python -m trainkit.plot` and `plot_runs` on a real, resumed training workdir."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import FAST, assert_user_error, run_cli, train

from trainkit.checkpoints.layout import read_alias
from trainkit.errors import TrainkitError
from trainkit.logging.metrics import read_metrics

pytest.importorskip("matplotlib")


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """20 steps, trained as 10 and then continued to 20 (one resume event at step 10); best by eval/accuracy."""
    workdir = tmp_path_factory.mktemp("plot") / "digits"
    train(workdir, *FAST, "--config.num_steps=10")
    train(workdir, *FAST)
    assert [r["step"] for r in read_metrics(workdir) if r.get("event") == "resume"] == [10]
    return workdir


def plot(*args: str):
    return run_cli(*args, module="trainkit.plot", timeout=120)


def test_cli_writes_one_image_for_several_runs(workdir, tmp_path):
    proc = plot(str(workdir), str(workdir), "--label=a", "--label=b", "-o", str(tmp_path / "curves.png"))
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "loss, accuracy of 2 run(s)" in proc.stdout
    proc = plot(str(workdir), "-o", str(tmp_path / "curves.svg"), "--metrics=loss")
    assert proc.returncode == 0 and b"<svg" in (tmp_path / "curves.svg").read_bytes()[:500]


def test_plot_runs_draws_curves_best_and_resumes(workdir, tmp_path):
    from trainkit.plot import plot_runs

    fig = plot_runs([workdir, workdir], tmp_path / "c.pdf", labels=["first", "second"])
    assert (tmp_path / "c.pdf").read_bytes()[:4] == b"%PDF"
    panels = {ax.get_title(): ax for ax in fig.axes if ax.get_visible()}
    assert list(panels) == ["loss", "accuracy"]  # one per family; grad_norm only on request
    records = read_metrics(workdir)
    evals = {r["step"]: r["eval/accuracy"] for r in records if "eval/accuracy" in r}
    lines = {line.get_label(): line for line in panels["accuracy"].get_lines()}
    assert list(lines["first eval"].get_xdata()) == sorted(evals)
    assert list(lines["second train"].get_xdata()) == [5, 10, 15, 20]
    best = read_alias(workdir / "checkpoints", "best")
    star = lines[f"first best (step {best})"]
    assert list(star.get_xdata()) == [best] and list(star.get_ydata()) == [evals[best]]
    assert not any("best" in label for label in (ln.get_label() for ln in panels["loss"].get_lines()))
    resumed = lines["first resumed"]  # a vertical line at the resume step, on every panel
    assert list(resumed.get_xdata()) == [10, 10]
    assert "second resumed" in {ln.get_label() for ln in panels["loss"].get_lines()}


def test_plot_runs_api_errors(workdir, tmp_path):
    from trainkit.plot import plot_runs

    with pytest.raises(TrainkitError, match="metrics.jsonl does not exist"):
        plot_runs([tmp_path], tmp_path / "x.png")
    with pytest.raises(TrainkitError, match="no metric family nope"):
        plot_runs([workdir], metrics=["nope"])
    with pytest.raises(TrainkitError, match="2 labels for 1 workdirs"):
        plot_runs([workdir], labels=["a", "b"])


def test_one_line_errors(workdir, tmp_path, read_only_dir):
    assert_user_error(plot(str(tmp_path / "nowhere"), "-o", str(tmp_path / "c.png")), "metrics.jsonl", "workdir")
    assert_user_error(plot(str(workdir), "-o", str(tmp_path / "c.bmpx")), "unknown suffix '.bmpx'", ".png")
    assert_user_error(plot(str(workdir), "-o", str(tmp_path / "missing" / "c.png")), "does not exist")
    ro = read_only_dir()
    assert_user_error(plot(str(workdir), "-o", str(ro / "c.png")), f"cannot write {ro / 'c.png'}")
    assert not (ro / "c.png").exists()
