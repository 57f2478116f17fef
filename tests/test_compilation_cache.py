"""The persistent compilation cache: on by default under the trainkit cache dir; the second start of the same
config compiles nothing new and reads the entries the first one wrote; `off` and a cache set through JAX itself
(the test session's, see conftest.py) are respected."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, cli_env, train

RUN = ("--config.num_steps=2", "--config.log_every=1", "--config.eval_every=2", "--config.checkpoint.every=0",
       "--config.export.formats=()")


def env_without_jax_cache(trainkit_cache: Path, **extra: str) -> dict[str, str]:
    """A user's environment: no JAX_COMPILATION_CACHE_DIR (the test session's cache is JAX's own setting)."""
    env = {k: v for k, v in cli_env().items()
           if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE", "JAX_ENABLE_COMPILATION_CACHE"))}
    return {**env, "TRAINKIT_CACHE": str(trainkit_cache), **extra}


def entries(directory: Path) -> dict[str, int]:
    """{cache entry: its last-access stamp (JAX rewrites the `-atime` file on every read)}."""
    return {p.name: int.from_bytes((directory / p.name.replace("-cache", "-atime")).read_bytes(), "little")
            for p in directory.glob("*-cache")}


@pytest.mark.slow
def test_second_start_of_the_same_config_reads_the_cache(tmp_path):
    cache = tmp_path / "cache"
    train(tmp_path / "a", *RUN, env=env_without_jax_cache(cache))
    first = entries(cache / "jax")
    names = {name.split("-")[0] for name in first}
    assert {"jit_train_step", "jit_eval_step"} <= names, names

    train(tmp_path / "b", *RUN, env=env_without_jax_cache(cache))  # another workdir: a restart compiles the same
    second = entries(cache / "jax")
    assert second.keys() == first.keys(), "the second start compiled something again"
    assert all(second[name] > first[name] for name in first), "an entry was not read by the second start"


@pytest.mark.slow
def test_off_and_a_cache_set_through_jax_are_left_alone(tmp_path):
    """`compilation_cache=off` writes no cache, nor does JAX_ENABLE_COMPILATION_CACHE=false (how the tests turn
    theirs off); JAX_COMPILATION_CACHE_DIR wins over trainkit's default."""
    train(tmp_path / "a", *RUN, "--config.compilation_cache=off", env=env_without_jax_cache(tmp_path / "tk"))
    train(tmp_path / "c", *RUN, env=env_without_jax_cache(tmp_path / "tk", JAX_ENABLE_COMPILATION_CACHE="false"))
    assert not (tmp_path / "tk" / "jax").exists()

    jax_cache = tmp_path / "jax-own"
    train(tmp_path / "b", *RUN, env=env_without_jax_cache(tmp_path / "tk", JAX_COMPILATION_CACHE_DIR=str(jax_cache),
                                                          JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0"))
    assert not (tmp_path / "tk" / "jax").exists()
    assert any(name.startswith("jit_train_step") for name in os.listdir(jax_cache))


@pytest.mark.slow
def test_two_processes_filling_one_cache_at_once(tmp_path):
    """Two runs start together on an empty cache (JAX locks it with filelock): both finish, neither warns about a
    torn entry, and a third start reads every entry and compiles nothing new."""
    cache = tmp_path / "cache"
    procs = [subprocess.Popen([sys.executable, "-m", "trainkit.main", "--config=configs/default.py",
                               f"--workdir={tmp_path / name}", *RUN], cwd=ROOT, env=env_without_jax_cache(cache),
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for name in "ab"]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    assert not any("persistent compilation cache" in out.lower() for out in outputs), outputs
    before = entries(cache / "jax")
    train(tmp_path / "c", *RUN, env=env_without_jax_cache(cache))
    after = entries(cache / "jax")
    assert after.keys() == before.keys() and all(after[k] > before[k] for k in before)
