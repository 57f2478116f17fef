"""`python -m trainkit.export SOURCE -o OUT`: the suffix of OUT picks the format.

    python -m trainkit.export W -o model.pt                      # TorchScript, standalone (torch only)
    python -m trainkit.export W/checkpoints/best -o model.stablehlo
    python -m trainkit.export hf://org/repo/model.ckpt -o model.safetensors   # token from $HF_TOKEN
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
    parser.add_argument("--tolerance", type=float, default=1e-5, help="max relative parity error (float32)")
    parser.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    return parser


@exits_cleanly
def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from absl import logging

    logging.set_verbosity(logging.ERROR)
    from trainkit.export.checkpoint import export_checkpoint

    export_checkpoint(args.source, args.output, hf_token=args.hf_token, tolerance=args.tolerance,
                      overwrite=args.overwrite)  # it makes SOURCE and OUT absolute (trainkit.paths)
    return 0


if __name__ == "__main__":
    sys.exit(main())
