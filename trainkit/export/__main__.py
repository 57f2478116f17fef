"""`python -m trainkit.export SOURCE -o OUT`: the suffix of OUT picks the format.

    python -m trainkit.export W -o model.pt                      # TorchScript, standalone (torch only)
    python -m trainkit.export W/checkpoints/best -o model.stablehlo
    python -m trainkit.export hf://org/repo/model.ckpt -o model.safetensors   # token from $HF_TOKEN
    python -m trainkit.export runs/pot -o model.pt --format metatomic --dtype float64   # LAMMPS, i-PI, ASE
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from trainkit.errors import ArgumentParser, exits_cleanly
from trainkit.export.formats import FORMATS


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(prog="python -m trainkit.export", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="workdir, step dir, alias, model.ckpt, https:// URL, hf://, gs://")
    parser.add_argument("-o", "--output", required=True, help="the suffix picks the format: " + ", ".join(
        f"model{f.suffix} ({f.description})" for f in FORMATS.values()))
    parser.add_argument("--hf_token", default=None, help="Hugging Face token (default: $HF_TOKEN); never stored")
    parser.add_argument("--format", default=None, choices=list(FORMATS),
                        help="pick the format by name where the suffix is ambiguous: --format metatomic for a "
                             "metatomic model.pt (LAMMPS, i-PI, ASE, TorchSim)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float64"],
                        help="float dtype of the artifact's inputs, weights and computation (MD engines: float64)")
    parser.add_argument("--tolerance", type=float, default=None,
                        help="max relative parity error (default 1e-5 in float32, 1e-10 in float64)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return parser


@exits_cleanly
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from absl import logging

    logging.set_verbosity(logging.ERROR)
    from trainkit.export.checkpoint import export_checkpoint

    # export_checkpoint makes SOURCE and OUT absolute (trainkit.paths)
    export_checkpoint(args.source, args.output, hf_token=args.hf_token, tolerance=args.tolerance,
                      overwrite=args.overwrite, dtype=args.dtype, format=args.format)
    return 0


if __name__ == "__main__":
    sys.exit(main())
