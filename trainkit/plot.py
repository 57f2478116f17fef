"""Training curves from workdirs: `python -m trainkit.plot W [W2 ...] -o curves.png`.

One subplot per metric family (`loss`, `accuracy`, `force_mae`, ... : `train/<name>` solid, `eval/<name>`
dashed with dots), several runs overlaid in their own colours, the best checkpoint marked with a star on its
metric's subplot, and resumes as dotted vertical lines. Everything comes from `W/metrics.jsonl` (metric and
`{"event": "resume"}` lines), `W/train_config.json` (`checkpoint.best_metric`) and the `W/checkpoints/best` alias.

    from trainkit.plot import plot_runs
    fig = plot_runs(["runs/a", "runs/b"], "curves.png", labels=["scratch", "fine-tuned"])
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path
from typing import Any, Sequence

from etils import epath

from trainkit.errors import ArgumentParser, TrainkitError, exits_cleanly
from trainkit.paths import absolute_path, is_local
from trainkit.logging.metrics import METRICS_FILE, read_metrics

SPLITS = ("train", "eval")
SKIPPED_FAMILIES = ("grad_norm",)  # plotted only when asked for: rarely what a curve comparison is about


@dataclasses.dataclass(frozen=True)
class Best:
    """The step the `best` alias points at, the metric it was chosen by, and that metric's value there."""

    step: int
    metric: str
    value: float | None


@dataclasses.dataclass(frozen=True)
class RunCurves:
    """What one workdir's plot needs: {"train/loss": ([steps], [values]), ...}, resume steps, best step."""

    label: str
    curves: dict[str, tuple[list[int], list[float]]]
    resumes: list[int]
    best: Best | None


def read_run(workdir: str | Path, label: str | None = None) -> RunCurves:
    """Read a workdir's curves (local or gs://); raise TrainkitError if it has no metrics.jsonl."""
    from trainkit.workdir import display_name

    workdir = Path(workdir) if is_local(workdir) else epath.Path(workdir)
    records = read_metrics(workdir)
    if not records:
        raise TrainkitError(f"{workdir / METRICS_FILE} does not exist or is empty; pass a training workdir "
                            "(the --workdir of python -m trainkit.main)")
    curves: dict[str, tuple[list[int], list[float]]] = {}
    resumes = []
    for record in records:
        if record.get("event") == "resume":
            resumes.append(int(record["step"]))
            continue
        for key, value in record.items():
            if key.split("/")[0] in SPLITS and isinstance(value, (int, float)):
                steps, values = curves.setdefault(key, ([], []))
                steps.append(int(record["step"]))
                values.append(float(value))
    return RunCurves(label or display_name(workdir), curves, resumes, _read_best(workdir, curves))


def _read_best(workdir: epath.Path | Path, curves: dict[str, tuple[list[int], list[float]]]) -> Best | None:
    from trainkit.checkpoints.layout import read_alias

    config_path = workdir / "train_config.json"
    step = read_alias(workdir / "checkpoints", "best") if (workdir / "checkpoints").is_dir() else None
    if step is None or not config_path.exists():
        return None
    metric = json.loads(config_path.read_text()).get("checkpoint", {}).get("best_metric", "eval/loss")
    steps, values = curves.get(metric, ([], []))
    value = values[steps.index(step)] if step in steps else None
    return Best(step, metric, value)


def families(runs: Sequence[RunCurves], include: Sequence[str] | None = None) -> list[str]:
    """Metric families to plot, in a stable order: loss first, then as they first appear."""
    seen: dict[str, None] = {}
    for run in runs:
        for key in run.curves:
            seen.setdefault(key.split("/", 1)[1], None)
    if include:
        missing = [f for f in include if f not in seen]
        if missing:
            raise TrainkitError(f"no metric family {', '.join(missing)} in these runs; "
                                f"they have {', '.join(seen) or 'none'}")
        return list(include)
    names = [f for f in seen if f not in SKIPPED_FAMILIES]
    return sorted(names, key=lambda f: (f != "loss", names.index(f)))


def plot_runs(workdirs: Sequence[str | Path], out: str | Path | None = None, *,
              labels: Sequence[str] | None = None, metrics: Sequence[str] | None = None,
              logy: bool = False) -> Any:
    """Plot the curves of `workdirs` (one colour each) into a matplotlib Figure; save it to `out` if given.
    In a notebook, show the saved file (`IPython.display.Image(out)`) or the Figure with pyplot imported.

    `labels` name the runs (default: the workdir names); `metrics` picks families (default: all but grad_norm);
    `logy` puts the y axes on a log scale. The output suffix picks the format (.png, .pdf, .svg, ...).
    """
    if not workdirs:
        raise TrainkitError("no workdir given; pass one or more training workdirs")
    if labels is not None and len(labels) != len(workdirs):
        raise TrainkitError(f"{len(labels)} labels for {len(workdirs)} workdirs; give one label per workdir")
    out_path = _check_output(Path(absolute_path(out))) if out is not None else None
    workdirs = [absolute_path(w) for w in workdirs]
    runs = [read_run(w, labels[i] if labels else None) for i, w in enumerate(workdirs)]
    names = families(runs, metrics)
    if not names:
        raise TrainkitError(f"{workdirs[0]}/{METRICS_FILE} has no train/ or eval/ metrics yet")

    # A bare Figure, not pyplot: no global figure registry, no GUI backend; savefig renders with Agg.
    from matplotlib.figure import Figure

    cols = min(len(names), 3)
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(4.8 * cols, 3.4 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax, family in zip(axes.flat, names):
        for i, run in enumerate(runs):
            _draw(ax, run, family, f"C{i}", multi=len(runs) > 1)
        ax.set_title(family)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if logy:
            ax.set_yscale("log")
        ax.legend(fontsize="small")
    for ax in list(axes.flat)[len(names):]:
        ax.set_visible(False)
    fig.tight_layout()
    if out_path is not None:
        try:
            fig.savefig(out_path, dpi=120)
        except OSError as e:
            raise TrainkitError(f"cannot write {out_path}: {e.strerror or e}; choose another -o path") from None
    return fig


def _draw(ax: Any, run: RunCurves, family: str, color: str, *, multi: bool) -> None:
    if not any(f"{split}/{family}" in run.curves for split in SPLITS):
        return
    prefix = f"{run.label} " if multi else ""
    for split, style in zip(SPLITS, ({"linestyle": "-"}, {"linestyle": "--", "marker": "o", "markersize": 3})):
        steps, values = run.curves.get(f"{split}/{family}", ([], []))
        if steps:
            ax.plot(steps, values, color=color, label=f"{prefix}{split}", **style)
    for k, step in enumerate(run.resumes):
        ax.axvline(step, color=color, linestyle=":", alpha=0.7, label=f"{prefix}resumed" if k == 0 else None)
    best = run.best
    if best is not None and best.value is not None and best.metric.split("/", 1)[1] == family:
        ax.plot([best.step], [best.value], marker="*", markersize=14, color=color, markeredgecolor="black",
                linestyle="none", label=f"{prefix}best (step {best.step})")


def _check_output(out: Path) -> Path:
    """One-line errors for an unknown suffix or a directory that cannot be written, before any work."""
    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = out.suffix.lower().lstrip(".")
    if suffix not in formats:
        raise TrainkitError(f"cannot write {out}: unknown suffix {out.suffix or '(none)'!r}; "
                            f"use one of {', '.join('.' + f for f in sorted(formats))}")
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        raise TrainkitError(f"cannot write {out}: directory {parent} does not exist; create it or choose another -o")
    if not os.access(parent, os.W_OK) or (out.exists() and not os.access(out, os.W_OK)):
        raise TrainkitError(f"cannot write {out}: permission denied; choose another -o path")
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m trainkit.plot", description=__doc__.splitlines()[0])
    parser.add_argument("workdirs", nargs="+", help="training workdirs (each with a metrics.jsonl)")
    parser.add_argument("-o", "--output", default="curves.png", help="image file; its suffix picks the format")
    parser.add_argument("--label", action="append", help="a run's label, once per workdir (default: its name)")
    parser.add_argument("--metrics", help="comma-separated families to plot, e.g. loss,accuracy")
    parser.add_argument("--logy", action="store_true", help="log-scale y axes")
    return parser


@exits_cleanly
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()] if args.metrics else None
    fig = plot_runs(args.workdirs, args.output, labels=args.label, metrics=metrics, logy=args.logy)
    panels = [ax.get_title() for ax in fig.axes if ax.get_visible()]
    print(f"wrote {args.output}: {', '.join(panels)} of {len(args.workdirs)} run(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
