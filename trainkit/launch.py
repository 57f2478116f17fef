"""Start N local trainkit processes as one multi-process run (tests, CPU experiments, single-node multi-GPU).

    python -m trainkit.launch -n 2 --devices_per_process 4 -- --config=configs/default.py --workdir=runs/mh

Each process gets `--coordinator_address=127.0.0.1:<free port> --num_processes=N --process_id=I` after the
given arguments; its output lines come out prefixed with `[I] `. SIGTERM/SIGINT to the launcher are forwarded
to every process (they agree on a step, save it and exit 0). If a process exits non-zero or is killed, the others
are stopped (SIGTERM, then SIGKILL after `--grace_period`) and the launcher exits non-zero with one line naming
the process. If the launcher itself dies, the kernel sends the processes SIGTERM (Linux).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from types import FrameType
from typing import IO, Sequence

from trainkit.paths import absolute_flags

DEFAULT_GRACE_S = 30.0
PATH_FLAGS = ("--config", "--workdir", "--resume_from", "--init_from")  # trainkit.main's path flags
_RESERVED = ("--coordinator_address", "--num_processes", "--process_id")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def describe_exit(returncode: int) -> str:
    """`exit status 2` or `killed by SIGKILL` for a Popen returncode."""
    if returncode < 0:
        try:
            return f"killed by {signal.Signals(-returncode).name}"
        except ValueError:
            return f"killed by signal {-returncode}"
    return f"exit status {returncode}"


def child_env(index: int, devices_per_process: int | None, gpus_per_process: int | None) -> dict[str, str]:
    """The environment of process `index`: fake CPU devices and/or its own GPUs, unbuffered output."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    if devices_per_process:
        flags = re.sub(r"--xla_force_host_platform_device_count=\S+", "", env.get("XLA_FLAGS", "")).split()
        env["XLA_FLAGS"] = " ".join([*flags, f"--xla_force_host_platform_device_count={devices_per_process}"])
    if gpus_per_process:
        first = index * gpus_per_process
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(g) for g in range(first, first + gpus_per_process))
    return env


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the launcher dies, so no process outlives it unsupervised."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux
        pass


class Launcher:
    """Supervises the processes of one run; `run()` returns the launcher's exit status."""

    def __init__(self, commands: Sequence[Sequence[str]], envs: Sequence[dict[str, str]], grace_s: float,
                 address: str = ""):
        self.commands, self.envs, self.grace_s, self.address = commands, envs, grace_s, address
        self.procs: list[subprocess.Popen] = []
        self._lock = threading.Lock()
        self._pumps: list[threading.Thread] = []

    def _pump(self, index: int, stream: IO[str], out: IO[str]) -> None:
        for line in stream:
            stripped = line.rstrip("\n")
            text = f"[{index}] {stripped}\n"
            with self._lock:  # whole lines only, never two processes' output interleaved within one
                out.write(text)
                out.flush()
        stream.close()

    def _forward(self, signum: int, frame: FrameType | None) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signum)

    def start(self) -> None:
        """Start the processes, announce their pids (first line of output), then relay their output."""
        for command, env in zip(self.commands, self.envs):
            # A session of its own: a terminal's Ctrl-C reaches the launcher once and is forwarded once.
            self.procs.append(subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                               text=True, bufsize=1, start_new_session=True,
                                               preexec_fn=_die_with_parent))
        pids = " ".join(str(p.pid) for p in self.procs)
        print(f"trainkit.launch: {len(self.procs)} processes (pids {pids}), coordinator {self.address}", flush=True)
        for index, proc in enumerate(self.procs):
            for stream, out in ((proc.stdout, sys.stdout), (proc.stderr, sys.stderr)):
                pump = threading.Thread(target=self._pump, args=(index, stream, out), daemon=True)
                pump.start()
                self._pumps.append(pump)

    def stop_others(self, failed: int) -> list[int]:
        """SIGTERM every other live process; SIGKILL those still running after the grace period (returned)."""
        live = [i for i, p in enumerate(self.procs) if i != failed and p.poll() is None]
        for i in live:
            self.procs[i].send_signal(signal.SIGTERM)
        deadline = time.monotonic() + self.grace_s
        killed = []
        for i in live:
            try:
                self.procs[i].wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.procs[i].kill()
                self.procs[i].wait()
                killed.append(i)
        return killed

    def run(self) -> int:
        previous = {sig: signal.signal(sig, self._forward) for sig in (signal.SIGTERM, signal.SIGINT)}
        killed: list[int] = []
        failed: int | None = None
        try:
            self.start()
            failed = self._wait_for_first_failure()
            if failed is not None:
                killed = self.stop_others(failed)
            for pump in self._pumps:
                pump.join(timeout=5)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        if failed is None:
            return 0
        code = self.procs[failed].returncode
        how = f"was {describe_exit(code)}" if code < 0 else f"exited with status {code}"
        hard = (f" (process {', '.join(map(str, killed))} needed SIGKILL after the {self.grace_s:g} s grace period)"
                if killed else "")
        print(f"trainkit: error: process {failed} of {len(self.procs)} {how}; stopped the others{hard}",
              file=sys.stderr, flush=True)
        return code if code > 0 else 128 - code

    def _wait_for_first_failure(self) -> int | None:
        """Index of the first process to exit non-zero, or None once all exited 0."""
        while True:
            running = False
            for index, proc in enumerate(self.procs):
                code = proc.poll()
                if code is None:
                    running = True
                elif code != 0:
                    return index
            if not running:
                return None
            time.sleep(0.05)


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """Launcher options before `--`, trainkit.main arguments after it."""
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(
        prog="python -m trainkit.launch",
        description="Run N local trainkit processes as one multi-process run.",
        epilog="example: python -m trainkit.launch -n 2 --devices_per_process 4 -- "
               "--config=configs/default.py --workdir=runs/mh",
    )
    parser.add_argument("-n", "--num_processes", type=int, required=True, help="number of processes")
    parser.add_argument("--devices_per_process", type=int, default=None,
                        help="fake CPU devices per process (XLA_FLAGS=--xla_force_host_platform_device_count=K)")
    parser.add_argument("--gpus_per_process", type=int, default=None,
                        help="give process i the GPUs i*G .. i*G+G-1 (CUDA_VISIBLE_DEVICES)")
    parser.add_argument("--grace_period", type=float, default=DEFAULT_GRACE_S,
                        help="seconds between SIGTERM and SIGKILL when stopping processes")
    parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free one)")
    parser.add_argument("--module", default="trainkit.main", help=argparse.SUPPRESS)
    return parser.parse_args(argv[:split]), argv[split + 1:]


def main(argv: Sequence[str] | None = None) -> int:
    """`trainkit launch -n N [options] -- <trainkit.main args>`; returns the exit status."""
    options, rest = parse_args(sys.argv[1:] if argv is None else argv)
    n = options.num_processes
    problem = None
    if n < 1:
        problem = f"-n {n}: the number of processes must be at least 1"
    elif clash := [a for a in rest if a.split("=")[0] in _RESERVED]:
        problem = f"{clash[0].split('=')[0]} is set by the launcher; remove it from the arguments after --"
    elif options.grace_period < 0:
        problem = f"--grace_period={options.grace_period:g} must be >= 0"
    if problem:
        print(f"trainkit: error: {problem}", file=sys.stderr, flush=True)
        return 2
    address = f"127.0.0.1:{options.port or free_port()}"
    rest = absolute_flags(rest, PATH_FLAGS)
    commands = [[sys.executable, "-m", options.module, *rest, f"--coordinator_address={address}",
                 f"--num_processes={n}", f"--process_id={i}"] for i in range(n)]
    envs = [child_env(i, options.devices_per_process, options.gpus_per_process) for i in range(n)]
    return Launcher(commands, envs, options.grace_period, address).run()


if __name__ == "__main__":
    sys.exit(main())
