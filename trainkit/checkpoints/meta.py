"""The `meta` item of a checkpoint step: typed, versioned, upgraded one format version at a time (as metatrain does).

On disk (`W/checkpoints/000040/meta/metadata`, the JSON that Orbax's JsonCheckpointHandler writes), version 1:

    {"model": "mlp", "best": {"step": 40, "value": 0.05}, "wandb_run_id": "ab12cd34", "format_version": 1, "step": 40}

`best` is `{}` until an eval has been recorded. `wandb_run_id` is there only when the run logs to W&B; it was added
within version 1 without a bump because it is optional both ways (older readers ignore it, a step without it reads
as None). The golden checkpoint tests/data/golden_v1 predates it.

Version 2 changed only the step's `manifest.json`: crc32c per file instead of sha256 (checkpoints.manifest reads
both). The meta JSON is the same apart from its `format_version`.

When the format changes: bump FORMAT_VERSION, add `upgrade_v{N}_to_v{N+1}` to UPGRADES, and add a golden checkpoint
of the new version beside the old ones (tests/test_golden.py); never edit an old one.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

from trainkit.errors import TrainkitError

FORMAT_VERSION = 2


def upgrade_v1_to_v2(raw: dict[str, Any]) -> dict[str, Any]:
    """Version 2 changed the manifest's checksum (sha256 -> crc32c), which is read per entry; meta is unchanged."""
    return {**raw, "format_version": 2}


# version N -> function(raw meta of version N) -> raw meta of version N + 1 (it sets "format_version" to N + 1).
UPGRADES: dict[int, Callable[[dict[str, Any]], dict[str, Any]]] = {1: upgrade_v1_to_v2}


@dataclasses.dataclass(frozen=True)
class Best:
    """The best eval so far: the step and its value of `checkpoint.best_metric`."""

    step: int
    value: float


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
    """What a step records beside its arrays. Always of the current FORMAT_VERSION: older ones are upgraded on read.

    Example: `CheckpointMeta(model="mlp", step=40, best=Best(step=40, value=0.05)).to_json()`
    """

    model: str
    step: int
    best: Best | None = None  # None until an eval has been recorded
    wandb_run_id: str | None = None  # the W&B run a resume continues to log to

    def to_json(self) -> dict[str, Any]:
        """The JSON written to disk. Orbax writes `json.dumps` of this dict, so its key order is the file's byte
        order: keep it, or steps written from now on differ from the older ones byte for byte."""
        raw: dict[str, Any] = {
            "model": self.model,
            "best": {"step": self.best.step, "value": self.best.value} if self.best is not None else {},
        }
        if self.wandb_run_id is not None:
            raw["wandb_run_id"] = self.wandb_run_id
        raw["format_version"] = FORMAT_VERSION
        raw["step"] = self.step
        return raw

    @classmethod
    def from_json(cls, raw: Mapping[str, Any], where: str = "this checkpoint") -> CheckpointMeta:
        """Read the JSON of any format version up to FORMAT_VERSION; `where` names the step in errors.
        Keys this version does not know are ignored, as older readers ignore `wandb_run_id`."""
        raw = upgrade(dict(raw), where)
        best = raw["best"]
        return cls(
            model=raw["model"],
            step=int(raw["step"]),
            best=Best(step=int(best["step"]), value=float(best["value"])) if best else None,
            wandb_run_id=raw.get("wandb_run_id"),
        )


def check_readable(version: int, where: str) -> None:
    """Refuse a checkpoint written by a newer trainkit: guessing at its format could load it wrongly."""
    if version > FORMAT_VERSION:
        raise TrainkitError(
            f"{where} has checkpoint format version {version}, newer than this trainkit reads "
            f"({FORMAT_VERSION}); upgrade trainkit (pip install -U trainkit)"
        )


def upgrade(raw: dict[str, Any], where: str = "this checkpoint") -> dict[str, Any]:
    """Bring raw meta of an older format version up to FORMAT_VERSION, one version at a time."""
    version = int(raw.get("format_version", 1))  # the first format wrote it too; 1 is the oldest there is
    check_readable(version, where)
    while version < FORMAT_VERSION:
        raw = UPGRADES[version](raw)
        version += 1
    return raw
