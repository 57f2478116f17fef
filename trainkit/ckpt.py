"""Inspect and manage checkpoints: `python -m trainkit.ckpt ls|inspect|verify|diff|pack`.

    python -m trainkit.ckpt ls W                        # steps, metrics, aliases, sizes
    python -m trainkit.ckpt inspect W/checkpoints/best  # tree, shapes, dtypes, config
    python -m trainkit.ckpt verify model.ckpt           # manifest check; exit 1 naming the damaged file
    python -m trainkit.ckpt diff A B                    # which leaves differ and by how much
    python -m trainkit.ckpt pack W -o model.ckpt        # one portable file
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

import numpy as np

from trainkit.errors import ArgumentParser, TrainkitError, exits_cleanly
from trainkit.paths import absolute_path


def _resolve(source: str, hf_token: str | None, *, verify: bool = True):
    from trainkit.checkpoints.sources import resolve_source

    return resolve_source(source, hf_token=hf_token, verify=verify)


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_leaves(v, f"{prefix}{k}/"))
        return out
    if isinstance(tree, (list, tuple)):
        out = {}
        for i, v in enumerate(tree):
            out.update(_leaves(v, f"{prefix}{i}/"))
        return out
    return {} if tree is None else {prefix.rstrip("/"): tree}


def _human(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if nbytes < 1000 or unit == "GB":
            return f"{nbytes:.1f} {unit}" if unit != "B" else f"{int(nbytes)} B"
        nbytes /= 1000
    return ""


def cmd_ls(args: argparse.Namespace) -> int:
    from trainkit.checkpoints.layout import list_steps, read_alias, step_dir_name
    from trainkit.checkpoints.manager import read_step_metrics
    from trainkit.checkpoints.manifest import read_manifest

    from etils import epath

    directory = epath.Path(args.workdir) / "checkpoints"  # a local or gs:// workdir
    if not directory.is_dir():
        raise TrainkitError(f"{args.workdir} has no checkpoints/ directory; pass a training workdir")
    aliases: dict[int, list[str]] = {}
    for name in ("last", "best", "final"):
        step = read_alias(directory, name)
        if step is not None:
            aliases.setdefault(step, []).append(name)
    rows = []
    for step in list_steps(directory):
        step_dir = directory / step_dir_name(step)
        manifest = read_manifest(step_dir) or {"files": {}}
        size = sum(f["size"] for f in manifest["files"].values())
        metrics = read_step_metrics(step_dir)
        rows.append({"step": step, "size": size, "aliases": aliases.get(step, []), "metrics": metrics})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print(f"{directory}: no complete checkpoints")
        return 0
    print(f"{'step':>8}  {'size':>9}  {'aliases':<17} metrics")
    for r in rows:
        metrics = " ".join(f"{k}={v:.4g}" for k, v in r["metrics"].items())
        print(f"{r['step']:>8}  {_human(r['size']):>9}  {','.join(r['aliases']):<17} {metrics}")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    import orbax.checkpoint as ocp

    from trainkit.checkpoints.meta import FORMAT_VERSION
    from trainkit.checkpoints.manager import read_step_info

    resolved = _resolve(args.source, args.hf_token)
    info = read_step_info(resolved.step_dir)
    meta, config = info.meta, info.config
    tree = ocp.Checkpointer(ocp.PyTreeCheckpointHandler()).metadata(resolved.step_dir / "state").item_metadata.tree
    leaves = _leaves(tree)
    if args.json:
        print(json.dumps({"step": resolved.step, "meta": meta.to_json(), "config": config, "tree": {
            k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in leaves.items()}}, indent=2))
        return 0
    print(f"{resolved.origin}: step {resolved.step}, model {meta.model!r}, "
          f"format version {FORMAT_VERSION}")  # read_meta upgraded it to the current format
    total = 0
    for name, leaf in leaves.items():
        size = int(np.prod(leaf.shape))
        total += size if name.startswith("params/") else 0
        print(f"  {name:<60} {str(tuple(leaf.shape)):<18} {leaf.dtype}")
    print(f"parameters: {total:,}")
    print("config: " + json.dumps({k: config[k] for k in ("model", "data", "num_steps", "batch_size", "seed")
                                   if k in config}))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from trainkit.checkpoints.manifest import verify_manifest

    resolved = _resolve(args.source, args.hf_token, verify=False)  # report every problem, not the first
    problems = verify_manifest(resolved.step_dir)
    if problems:
        for p in problems:
            print(f"DAMAGED {resolved.step_dir}: {p}", file=sys.stderr)
        return 1
    print(f"OK {resolved.origin} (step {resolved.step})")
    return 0


def cmd_diff(args: argparse.Namespace) -> int:
    from trainkit.checkpoints.manager import read_state_arrays

    a = _leaves(read_state_arrays(_resolve(args.a, args.hf_token).step_dir))
    b = _leaves(read_state_arrays(_resolve(args.b, args.hf_token).step_dir))
    differing = 0
    for name in sorted(a.keys() | b.keys()):
        if name not in a or name not in b:
            print(f"{name}: only in {'A' if name in a else 'B'}")
            differing += 1
        elif a[name].shape != b[name].shape:
            print(f"{name}: shape {a[name].shape} vs {b[name].shape}")
            differing += 1
        elif not np.array_equal(a[name], b[name]):
            delta = np.abs(np.asarray(a[name], np.float64) - np.asarray(b[name], np.float64))
            print(f"{name}: max |A-B| = {delta.max():.3g}, mean = {delta.mean():.3g}")
            differing += 1
    print(f"{differing} of {len(a.keys() | b.keys())} leaves differ")
    return 1 if differing else 0


def cmd_pack(args: argparse.Namespace) -> int:
    from trainkit.checkpoints.packing import pack
    from trainkit.workdir import prepare_output

    prepare_output(args.output)
    resolved = _resolve(args.source, args.hf_token)
    out = pack(resolved.step_dir, args.output)
    print(f"packed step {resolved.step} of {resolved.origin} into {out} ({_human(out.stat().st_size)})")
    return 0


# The paths the commands use themselves, made absolute before any command sees them (SOURCE arguments are made
# absolute by resolve_source, the one place that reads them).
PATH_ARGUMENTS = ("workdir", "output")


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m trainkit.ckpt", description=__doc__.splitlines()[0])
    parser.add_argument("--hf_token", default=None, help="token for hf:// sources (default: $HF_TOKEN)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ls", help="steps, metrics, aliases, sizes of a workdir")
    p.add_argument("workdir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_ls)
    p = sub.add_parser("inspect", help="tree, shapes, dtypes and config of a checkpoint")
    p.add_argument("source")
    p.add_argument("--json", action="store_true")
    p.set_defaults(fn=cmd_inspect)
    p = sub.add_parser("verify", help="check the manifest (sizes, checksums); exit 1 on damage")
    p.add_argument("source")
    p.set_defaults(fn=cmd_verify)
    p = sub.add_parser("diff", help="which leaves differ between two checkpoints, and by how much")
    p.add_argument("a")
    p.add_argument("b")
    p.set_defaults(fn=cmd_diff)
    p = sub.add_parser("pack", help="one portable file (model.ckpt)")
    p.add_argument("source")
    p.add_argument("-o", "--output", required=True)
    p.set_defaults(fn=cmd_pack)
    return parser


@exits_cleanly
def main(argv: Sequence[str] | None = None) -> int:
    from absl import logging

    logging.set_verbosity(logging.ERROR)  # Orbax warns about optional metadata files on every read
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in PATH_ARGUMENTS:
        if getattr(args, name, None) is not None:
            setattr(args, name, absolute_path(getattr(args, name)))
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
