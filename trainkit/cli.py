"""The `trainkit` console script: `trainkit train|export|ckpt|launch|plot ...`, the same as `python -m trainkit.X`.

    trainkit train --config=configs/default.py --workdir=W
    trainkit export W -o model.pt
    trainkit ckpt ls W
"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "train": ("trainkit.main", "train a config (python -m trainkit.main)"),
    "export": ("trainkit.export.__main__", "export a checkpoint to .pt/.stablehlo/.safetensors"),
    "ckpt": ("trainkit.ckpt", "ls|inspect|verify|diff|pack checkpoints"),
    "launch": ("trainkit.launch", "start N local processes of a training run"),
    "plot": ("trainkit.plot", "plot training curves of one or more workdirs"),
}


def usage() -> str:
    lines = ["usage: trainkit COMMAND [ARGS...]", "", "commands:"]
    lines += [f"  {name:<8} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"trainkit: error: unknown command {name!r}; use one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module = importlib.import_module(COMMANDS[name][0])
    if name == "train":  # absl parses sys.argv itself
        sys.argv = [f"trainkit {name}", *rest]
        module.run()
        return 0
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
