"""Restore at disk speed: a step's arrays read straight from their files, in parallel, into the target shardings.

trainkit saves a local state of large arrays as a zarr per array (checkpoints.manager `_orbax`), uncompressed: each
array is one file of raw C-order bytes per chunk (one chunk per saved shard), `state/<name>/0.0` beside its
`.zarray`. This reads an array's chunk files into 64-byte-aligned host memory (with `readinto` straight into place
when chunks split only the first axis, else through one buffer per chunk), hands that memory to JAX without a copy
(dlpack), and places it in the leaf's target sharding; a thread pool reads several arrays at once. Measured here
on a 1.07 GB state: 3.5–4.5 GB/s, where Orbax's restore (tensorstore) read the same files at 0.3–0.6 GB/s and
torch.load at 1.5 (memory the process touches for the first time is slow to fault in on this VM: all pay that).

Anything else — OCDBT, compression, uneven or missing chunks, another dtype or shape than the target, gs://, a
sharding spread over several processes — returns None, and Orbax restores it (`manager.restore_step`). The layout
is checked from each array's `.zarray` (zarr format 2) before a byte is read, so a layout Orbax may write
differently one day falls back rather than being misread.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from trainkit.paths import is_local

_ALIGN = 64  # what XLA's CPU client needs to use host memory in place
_THREADS = min(8, max(2, os.cpu_count() or 1))


@dataclasses.dataclass(frozen=True)
class _ArrayFile:
    chunks: list[tuple[str, tuple[slice, ...]]]  # each chunk's file and where it goes in the array
    shape: tuple[int, ...]
    chunk_shape: tuple[int, ...]
    dtype: np.dtype
    sharding: jax.sharding.Sharding


def read_state(state_dir: epath.PathLike, abstract_state: Any) -> Any | None:
    """`abstract_state`'s arrays read from `state_dir` (an Orbax PyTree item), or None when the layout is not the
    plain one this reads (then Orbax restores it). Example: `read_state(step_dir / "state", abstract)`."""
    state_dir = epath.Path(state_dir)
    if not is_local(state_dir) or (state_dir / "manifest.ocdbt").exists():
        return None
    leaves, treedef = jax.tree.flatten(abstract_state)
    if not leaves or not all(isinstance(leaf, jax.ShapeDtypeStruct) and leaf.sharding is not None
                             and leaf.sharding.is_fully_addressable for leaf in leaves):
        return None
    names = jax.tree.leaves(ocp.tree.get_param_names(abstract_state))
    if len(names) != len(leaves):
        return None
    files = [_array_file(os.fspath(state_dir / name), leaf) for name, leaf in zip(names, leaves)]
    if any(f is None for f in files):
        return None
    with ThreadPoolExecutor(min(_THREADS, len(files))) as pool:
        arrays = list(pool.map(_read, files))
    return jax.tree.unflatten(treedef, arrays)


def _array_file(directory: str, leaf: jax.ShapeDtypeStruct) -> _ArrayFile | None:
    """The one raw file of an uncompressed single-chunk zarr array of `leaf`'s shape and dtype, else None."""
    try:
        with open(os.path.join(directory, ".zarray")) as f:
            z = json.load(f)
        dtype = np.dtype(z["dtype"])
    except (OSError, ValueError, TypeError, KeyError):
        return None
    shape = tuple(leaf.shape)
    chunk_shape = tuple(z.get("chunks", ()))
    plain = (z.get("zarr_format") == 2 and z.get("compressor") is None and z.get("filters") is None
             and z.get("order") == "C" and tuple(z.get("shape", ())) == shape and len(chunk_shape) == len(shape)
             and all(c > 0 and n % c == 0 for n, c in zip(shape, chunk_shape))
             and dtype == np.dtype(leaf.dtype) and dtype.byteorder in ("=", "|", "<" if np.little_endian else ">"))
    if not plain:
        return None
    separator = z.get("dimension_separator", ".")
    chunk_bytes = int(np.prod(chunk_shape, dtype=np.int64)) * dtype.itemsize
    chunks = []
    for index in itertools.product(*(range(n // c) for n, c in zip(shape, chunk_shape))):
        path = os.path.join(directory, separator.join(str(i) for i in index) if index else "0")
        try:
            if os.path.getsize(path) != chunk_bytes:
                return None
        except OSError:  # an unwritten chunk (fill value) or another layout
            return None
        chunks.append((path, tuple(slice(i * c, (i + 1) * c) for i, c in zip(index, chunk_shape))))
    return _ArrayFile(chunks, shape, chunk_shape, dtype, leaf.sharding)


def _read_into(path: str, view: memoryview) -> None:
    with open(path, "rb", buffering=0) as f:
        done = 0
        while done < len(view):
            n = f.readinto(view[done:])
            if not n:
                raise OSError(f"{path} ended after {done} of {len(view)} bytes")
            done += n


def _read(file: _ArrayFile) -> jax.Array:
    nbytes = int(np.prod(file.shape, dtype=np.int64)) * file.dtype.itemsize
    buffer = np.empty(nbytes + _ALIGN, np.uint8)
    offset = (-buffer.ctypes.data) % _ALIGN
    host = buffer[offset:offset + nbytes]
    if file.chunk_shape[1:] == file.shape[1:]:  # chunks are consecutive runs of bytes: read each into place
        chunk_bytes = nbytes // len(file.chunks)
        row_bytes = nbytes // file.shape[0] if file.shape else 0
        for path, where in file.chunks:
            start = where[0].start * row_bytes if where else 0
            _read_into(path, memoryview(host)[start:start + chunk_bytes])
    else:
        whole = host.view(file.dtype).reshape(file.shape)
        chunk = np.empty(file.chunk_shape, file.dtype)
        for path, where in file.chunks:
            _read_into(path, memoryview(chunk.reshape(-1).view(np.uint8)))
            whole[where] = chunk
    array = host.view(file.dtype).reshape(file.shape)
    try:
        on_device = jax.dlpack.from_dlpack(array, copy=False)  # the host memory itself, on the CPU backend
    except (ValueError, TypeError, RuntimeError):
        on_device = array
    return jax.device_put(on_device, file.sharding)
