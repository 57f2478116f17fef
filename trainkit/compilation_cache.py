"""The persistent JAX compilation cache: a restart, or a second run of the same config, loads its compiled init,
train and eval steps from disk instead of compiling them again.

`compilation_cache` (config): "auto" (default) puts it in `<trainkit cache dir>/jax` (`$TRAINKIT_CACHE/jax`, else
`~/.cache/trainkit/jax`): a local disk even when the workdir is on gs://. "off" turns it off; anything else is a
directory. A cache set through JAX itself (`JAX_COMPILATION_CACHE_DIR`, or `jax.config.update(
"jax_compilation_cache_dir", ...)` before training) takes precedence and is left exactly as it is, thresholds
included, and so does `JAX_ENABLE_COMPILATION_CACHE=false`: the test suite's per-session cache (tests/conftest.py)
relies on both.

Several processes may share one cache (a multi-process launch, runs side by side): trainkit bounds its size, which
makes JAX take a file lock around every read and write; a torn entry would only be a warning and a recompile.
"""

from __future__ import annotations

import os

import jax

from trainkit.paths import absolute_path, default_cache_dir

MAX_BYTES = 2 << 30  # least recently used entries go first beyond this
# JAX caches only programs that took >= 1 s to compile by default; on CPU the steps of a small model compile in
# less. All of them: a run of configs/default.py writes five entries (~230 kB), and a threshold on measured compile
# time would make what is cached depend on the machine's load.
MIN_COMPILE_SECS = 0.0


def enable_compilation_cache(setting: str) -> str | None:
    """Point JAX's persistent cache at `setting` ("auto", "off" or a directory) unless JAX already has a cache
    directory; returns the directory in use (None: off). Call before the first compilation.

        enable_compilation_cache("auto")   # '/home/me/.cache/trainkit/jax'
    """
    if not jax.config.jax_enable_compilation_cache:  # JAX_ENABLE_COMPILATION_CACHE=false: turned off through JAX
        return None
    current = jax.config.jax_compilation_cache_dir
    if current:  # set through JAX itself: the caller's choice wins
        return current
    if setting == "off":
        return None
    directory = str(default_cache_dir() / "jax") if setting == "auto" else absolute_path(setting)
    os.makedirs(directory, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_SECS)
    jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
    return directory
