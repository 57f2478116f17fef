"""Multi-process runs: jax.distributed setup, the agreed stop step, and the checks that keep processes in step.

A multi-process run is N copies of the same program, one per host (or per local group of devices), talking to a
coordination service hosted by process 0. trainkit starts it from explicit flags
(`--coordinator_address=HOST:PORT --num_processes=N --process_id=I`, what `trainkit.launch` passes), or lets
jax auto-detect a Cloud TPU VM, a SLURM `srun` step or an Open MPI job. A single process initialises nothing.

One timeout (`--distributed_timeout`, seconds) bounds the waits on other processes: the start-up wait for the
coordinator and the peers, the heartbeat after which a dead or frozen peer counts as dead (jax then ends every
process, which also ends any device collective or Orbax barrier waiting for it), and trainkit's stop votes
(`agree_on_stop`). The shutdown barrier waits longer: process 0 may still be writing exports.

Stop votes go through the coordination service's key-value store and barriers, not device collectives: they
have timeouts, and they cannot deadlock behind queued device work.
"""

from __future__ import annotations

import os
import socket
import time
from typing import Any

import jax
import numpy as np

from trainkit.errors import TrainkitError

DEFAULT_TIMEOUT_S = 300
SHUTDOWN_TIMEOUT_S = 3600
_STOP_PREFIX = "trainkit/stop"


class _Settings:
    timeout_s: int = DEFAULT_TIMEOUT_S


def timeout_s() -> int:
    """The bound on any wait for another process (`--distributed_timeout`)."""
    return _Settings.timeout_s


def detect_cluster() -> str | None:
    """The multi-process environment jax.distributed can configure itself from, or None on one machine.

    Looked up from environment variables only (no network), so a laptop never waits on a metadata server."""
    env = os.environ
    if "SLURM_STEP_NODELIST" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return "slurm"  # inside `srun`: SLURM_PROCID / SLURM_NTASKS give the process index and count
    if "OMPI_MCA_orte_hnp_uri" in env and int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
        return "ompi"
    if any(k in env for k in ("TPU_WORKER_HOSTNAMES", "TPU_PROCESS_ADDRESSES", "MEGASCALE_COORDINATOR_ADDRESS")):
        return "tpu"  # GKE TPU node pools and multislice set these
    try:  # a Cloud TPU VM (set when `import jax` found TPU chips); the worker list comes from its metadata
        from jax._src import cloud_tpu_init

        if cloud_tpu_init.running_in_cloud_tpu_vm:
            return "tpu"
    except ImportError:  # a jax without the private module: explicit flags still work
        pass
    return None


def initialize(
    coordinator_address: str | None,
    num_processes: int | None,
    process_id: int | None,
    timeout: int = DEFAULT_TIMEOUT_S,
) -> None:
    """Start jax.distributed if this is a multi-process run; call before anything touches devices.

    Explicit flags win; otherwise a known cluster (see `detect_cluster`) configures itself; otherwise this is a
    single process and nothing happens. Example: `initialize("10.0.0.1:8476", 4, 0, timeout=120)`."""
    if timeout <= 0:
        raise TrainkitError(f"--distributed_timeout={timeout} must be a positive number of seconds")
    timeout = _Settings.timeout_s = int(timeout)
    explicit = {"--coordinator_address": coordinator_address, "--num_processes": num_processes,
                "--process_id": process_id}
    given = [k for k, v in explicit.items() if v is not None]
    if num_processes == 1 and coordinator_address is None:
        return  # asked for one process: no coordination service, no auto-detection
    if given and len(given) < 3:
        missing = ", ".join(k for k in explicit if k not in given)
        raise TrainkitError(f"{', '.join(given)} given without {missing}; a multi-process run needs "
                            "--coordinator_address=HOST:PORT --num_processes=N --process_id=I on every process")
    if not given:
        cluster = detect_cluster()
        if cluster is not None:
            _start(timeout, how=f"auto-detected {cluster}")
        return
    assert coordinator_address is not None and num_processes is not None and process_id is not None
    if num_processes < 1 or not 0 <= process_id < num_processes:
        raise TrainkitError(f"--process_id={process_id} must be in [0, {num_processes}) "
                            f"(--num_processes={num_processes})")
    host, _, port = coordinator_address.rpartition(":")
    if not host or not port.isdigit():
        raise TrainkitError(f"--coordinator_address={coordinator_address} must be HOST:PORT, e.g. 10.0.0.1:8476")
    if process_id != 0:
        # jax aborts the process (no exception) when the coordinator never answers; check first, in Python.
        wait_for_coordinator(host.strip("[]"), int(port), timeout, process_id)
    _start(timeout, how=f"coordinator {coordinator_address}", coordinator_address=coordinator_address,
           num_processes=num_processes, process_id=process_id)


def _start(timeout: int, how: str, **explicit: Any) -> None:
    # trainkit's own SIGTERM handler and agreed stop step replace jax's preemption notifier; with both, jax's
    # handler would swallow a SIGTERM that arrives before training starts.
    jax.config.update("jax_enable_preemption_service", False)
    # Process 0 may still be exporting when the others finish: they wait for it at jax's shutdown barrier, and
    # jax aborts every process if that wait times out. A dead process 0 still ends the wait (heartbeats).
    jax.distributed.initialize(**explicit, initialization_timeout=timeout, heartbeat_timeout_seconds=timeout,
                               shutdown_timeout_seconds=max(timeout, SHUTDOWN_TIMEOUT_S))
    index, count, devices = jax.process_index(), jax.process_count(), jax.device_count()  # on all: collective
    if index == 0:
        print(f"trainkit: {count} processes ({how}), {devices} devices", flush=True)


def wait_for_coordinator(host: str, port: int, timeout: float, process_id: int) -> None:
    """Poll until process 0's coordination service accepts connections, or raise a one-line TrainkitError."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((host, port), timeout=min(5.0, timeout)):
                return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise TrainkitError(
                    f"process {process_id}: coordinator {host}:{port} unreachable for {timeout:g} s "
                    f"({e.strerror or e}); start process 0 with the same --coordinator_address, check the "
                    "address and firewall, or raise --distributed_timeout"
                ) from None
            time.sleep(0.25)


def _client() -> Any:
    from jax._src import distributed as jax_distributed  # the client Orbax's barriers use too

    client = jax_distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialized")
    return client


def agree_on_stop(step: int, local_reason: str | None) -> str | None:
    """All processes' answer to "stop at `step`?": the reason of the lowest-numbered process that wants to stop
    ("SIGTERM", "SIGINT", "walltime"), or None. Every process must call it at the same steps.

    Each process that wants to stop leaves a vote under this step, then all meet at a barrier; after it every
    vote for the step is in, so every process reads the same votes and takes the same decision."""
    if jax.process_count() == 1:
        return local_reason
    client = _client()
    if local_reason:
        client.key_value_set(f"{_STOP_PREFIX}/{step}/{jax.process_index():06d}", local_reason)
    try:
        client.wait_at_barrier(f"{_STOP_PREFIX}/{step}", timeout_s() * 1000)
    except jax.errors.JaxRuntimeError as e:
        raise TrainkitError(peer_failure(step, e)) from None
    votes = sorted(client.key_value_dir_get(f"{_STOP_PREFIX}/{step}/"))
    return votes[0][1] if votes else None


def peer_failure(step: int, error: Exception) -> str:
    """A one-line explanation of a stop vote that some processes did not reach in time."""
    text = str(error)
    late: list[str] = []
    if "timed out task names:" in text:
        late = [n.rsplit(":", 1)[-1] for n in text.split("timed out task names:", 1)[1].split("RPC:")[0].split()]
    me, timeout = jax.process_index(), timeout_s()
    if str(me) in late:
        return (f"process {me} reached step {step} after the others had stopped waiting for it "
                f"(--distributed_timeout={timeout} s); raise --distributed_timeout, then run the same command again")
    who = f"process {', '.join(late)}" if late else "another process"
    return (f"process {me}: {who} did not reach step {step} within {timeout} s (--distributed_timeout): it died "
            "or hung; see its log, then run the same command again to resume from the last checkpoint")


def broadcast_from_primary(value: int | None) -> int | None:
    """Process 0's `value` on every process (an int or None); also a barrier. One process: `value` itself."""
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils

    sent = np.int64(-1 if value is None else value)
    received = int(multihost_utils.broadcast_one_to_all(sent))
    return None if received < 0 else received


def check_batch_split(batch_sharding: jax.sharding.Sharding, batch_size: int) -> None:
    """Each process must own a distinct 1/N of the batch rows: trainkit.data.pipeline loads only that share.

    A mesh whose batch axes (data x fsdp) do not span the processes would replicate rows across processes that
    loaded different data, so refuse it with the fix."""
    if jax.process_count() == 1:
        return
    rows: set[int] = set()
    for index in batch_sharding.addressable_devices_indices_map((batch_size,)).values():
        rows.update(range(*index[0].indices(batch_size)))
    share = batch_size // jax.process_count()
    if len(rows) != share:
        raise TrainkitError(
            f"the mesh gives process {jax.process_index()} {len(rows)} of the {batch_size} batch rows, not a "
            f"distinct 1/{jax.process_count()} ({share}); make mesh.data x mesh.fsdp a multiple of the "
            f"{jax.process_count()} processes (e.g. --config.mesh.data=-1 --config.mesh.model=1)"
        )

