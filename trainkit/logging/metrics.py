"""The one place that writes metrics: metrics.jsonl, TensorBoard, W&B (optional), on process 0 only."""

from __future__ import annotations

import json
import os
import sys
from typing import Any, Mapping

import jax
from etils import epath

METRICS_FILE = "metrics.jsonl"


def read_metrics(workdir: epath.PathLike) -> list[dict[str, Any]]:
    """All records of W/metrics.jsonl (metrics lines and `event` lines such as resumes); W may be gs://."""
    path = epath.Path(workdir) / METRICS_FILE
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines()
    if lines and not text.endswith("\n"):  # a last line torn by a full disk or a crash: never finished, skip it
        try:
            json.loads(lines[-1])
        except ValueError:
            lines.pop()
    return [json.loads(line) for line in lines if line.strip()]


def _summary_writer_class():
    """tensorboardX's SummaryWriter, imported late (it is slow to import) and without PyTorch: tensorboardX
    imports torch when it can, only to accept torch tensors, which costs ~1.5 s of every run's start
    (bench/first_step.py). While it loads, `import torch` fails unless torch is already imported."""
    if "torch" in sys.modules:
        from tensorboardX import SummaryWriter

        return SummaryWriter
    sys.modules["torch"] = None  # type: ignore[assignment]  # `import torch` raises ImportError
    try:
        from tensorboardX import SummaryWriter
    finally:
        del sys.modules["torch"]
    return SummaryWriter


class MetricsWriter:
    """Appends `{"step": s, "train/loss": ...}` lines; on resume, drops lines past the restored step so that
    no step is ever recorded twice, and records the resume as an event line. For a gs:// workdir the files are
    written locally and uploaded every 30 s, at every `sync()` (each checkpoint save) and at `close()`."""

    def __init__(self, workdir: epath.Path, start_step: int, *, resumed: bool, wandb_run: Any = None):
        from trainkit.workdir import Staged

        self.enabled = jax.process_index() == 0
        self._wandb = wandb_run
        self._tb = None
        if not self.enabled:
            return
        self._staged = Staged(workdir, (METRICS_FILE, "tensorboard"))
        self.path = self._staged.local / METRICS_FILE
        kept = [r for r in read_metrics(workdir) if r.get("step", 0) <= start_step]
        if kept or self.path.exists():
            tmp = self.path.with_name(f".{METRICS_FILE}.tmp")
            tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
            os.replace(tmp, self.path)  # a kill mid-rewrite leaves the old file, not a truncated one
        self._file = self.path.open("a")
        if resumed:
            self._line({"step": start_step, "event": "resume"})
        self._tb = _summary_writer_class()(str(self._staged.local / "tensorboard"), purge_step=start_step + 1)
        self._staged.sync(force=True)

    def _line(self, record: Mapping[str, Any]) -> None:
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def write(self, step: int, metrics: Mapping[str, float]) -> None:
        if not self.enabled:
            return
        values = {k: float(v) for k, v in metrics.items()}
        self._line({"step": step, **values})
        for k, v in values.items():
            self._tb.add_scalar(k, v, step)
        if self._wandb is not None:
            self._wandb.log(values, step=step)
        self._staged.sync()

    def sync(self) -> None:
        """Upload now (a gs:// workdir; no-op for a local one): called at each checkpoint save."""
        if self.enabled and self._staged.remote is not None:
            self._tb.flush()
            self._staged.sync(force=True)

    def close(self) -> None:
        if self.enabled:
            self._file.close()
            self._tb.close()
            self._staged.close()
