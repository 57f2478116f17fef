"""jax.distributed setup: explicit flags, auto-detection on TPU pods / SLURM, or single process."""

from __future__ import annotations

import os

import jax


def initialize(coordinator_address: str | None, num_processes: int | None, process_id: int | None) -> None:
    """Explicit flags win; otherwise jax.distributed auto-detects cluster environments it knows."""
    if coordinator_address:
        jax.distributed.initialize(coordinator_address=coordinator_address, num_processes=num_processes,
                                   process_id=process_id)
    elif any(k in os.environ for k in ("TPU_WORKER_HOSTNAMES", "SLURM_JOB_ID", "MEGASCALE_COORDINATOR_ADDRESS")):
        if int(os.environ.get("SLURM_NTASKS", "1")) > 1 or "TPU_WORKER_HOSTNAMES" in os.environ:
            jax.distributed.initialize()
