"""Byte-level language modelling on Python's own standard-library sources (nothing is downloaded).

The text is the concatenation of a fixed list of pure-Python stdlib modules, read from the running
interpreter's `sysconfig.get_paths()["stdlib"]` (~800 KB). Tokens are bytes (a fixed vocabulary of 256), so
any text round-trips and exported models need no tokenizer. The first 90% (by position) trains, the rest
evaluates. Examples are windows of `seq_len + 1` tokens: `{"tokens": int32[seq_len + 1]}`; the model reads
the first `seq_len` and predicts the last `seq_len`.

Patch releases of Python occasionally edit these files; `info["text_sha256"]` records exactly which text a
run saw.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import sysconfig
from collections.abc import Sequence
from pathlib import Path

import ml_collections
import numpy as np

from trainkit.data import Dataset
from trainkit.errors import TrainkitError

VOCAB_SIZE = 256

# Pure-Python modules with plenty of prose (docstrings) and code; order fixed: the eval split is the tail.
MODULES = (
    "textwrap", "string", "heapq", "bisect", "fractions", "statistics", "calendar", "functools",
    "dataclasses", "enum", "pprint", "random", "colorsys", "numbers", "copy", "reprlib", "shlex", "fnmatch",
    "graphlib", "contextlib", "operator", "datetime", "cmd", "code", "sched", "queue", "difflib",
)


@functools.lru_cache(maxsize=4)
def stdlib_text(modules: Sequence[str] = MODULES) -> bytes:
    """The UTF-8 bytes of the given stdlib modules' source files, each preceded by a `# file:` line."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts = []
    for name in modules:
        path = root / f"{name.replace('.', '/')}.py"
        if not path.is_file():
            raise TrainkitError(
                f"the chars dataset reads the standard library's sources, but {path} is missing; "
                "use a Python install that ships them (e.g. python3.11, not only python3.11-minimal)"
            )
        parts.append(f"# file: {name}.py\n".encode() + path.read_bytes())
    return b"\n".join(parts)


def unigram_entropy(tokens: np.ndarray, vocab_size: int = VOCAB_SIZE) -> float:
    """Entropy (nats/token) of the token frequencies: the loss of the best model that ignores context."""
    p = np.bincount(tokens, minlength=vocab_size) / len(tokens)
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


@dataclasses.dataclass(frozen=True)
class WindowSource:
    """Windows `tokens[s : s + length]` for each start `s` in `starts`: random access, deterministic."""

    tokens: np.ndarray  # int32, the whole split
    starts: np.ndarray  # int64
    length: int

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, index: int) -> dict[str, np.ndarray]:
        s = int(self.starts[index])
        return {"tokens": self.tokens[s : s + self.length]}

    def take(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray]:
        """A stacked batch of windows (the pipeline's fast path)."""
        rows = self.starts[np.asarray(indices)][:, None] + np.arange(self.length)
        return {"tokens": self.tokens[rows]}


def windows(tokens: np.ndarray, length: int, stride: int, limit: int = 0) -> WindowSource:
    """Windows of `length` tokens every `stride` tokens; with `limit` > 0, at most `limit`, evenly spread."""
    if len(tokens) < length:
        raise TrainkitError(
            f"the text split has {len(tokens)} tokens, fewer than one window of {length}; "
            "lower --config.data.seq_len"
        )
    starts = np.arange(0, len(tokens) - length + 1, stride, dtype=np.int64)
    if 0 < limit < len(starts):
        starts = starts[np.linspace(0, len(starts) - 1, limit).round().astype(np.int64)]
    return WindowSource(tokens, starts, length)


def load(config: ml_collections.ConfigDict) -> Dataset:
    """Train windows start every `stride` bytes; eval windows do not overlap (capped at `max_eval_windows`).

    config.data keys: seq_len, stride (default 1), eval_fraction (default 0.1), max_eval_windows (0 = all),
    modules (default: `MODULES`).
    """
    seq_len = int(config.seq_len)
    modules = tuple(config.get("modules", None) or MODULES)
    text = stdlib_text(modules)
    tokens = np.frombuffer(text, dtype=np.uint8).astype(np.int32)
    tokens.setflags(write=False)
    n_eval = round(len(tokens) * config.get("eval_fraction", 0.1))
    train_tokens, eval_tokens = tokens[:-n_eval], tokens[-n_eval:]
    train = windows(train_tokens, seq_len + 1, int(config.get("stride", 1)))
    evals = windows(eval_tokens, seq_len + 1, seq_len, int(config.get("max_eval_windows", 0)))
    info = {
        "vocab_size": VOCAB_SIZE,
        "seq_len": seq_len,
        "unigram_entropy": unigram_entropy(train_tokens),  # nats/byte of the training text
        "train_tokens": len(train_tokens),
        "eval_tokens": len(eval_tokens),
        "text_sha256": hashlib.sha256(text).hexdigest(),
    }
    return Dataset(train=train, eval=evals, info=info)
