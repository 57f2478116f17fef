"""Train from a config file: `python -m trainkit.main --config=configs/default.py --workdir=W`."""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

from trainkit.errors import exits_cleanly, fail

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Config file, optionally with an argument: configs/lm_chars.py:tiny")
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and exports.")
flags.DEFINE_string("resume_from", None, "Resume the full state from a checkpoint SOURCE (path, alias, URL, hf://).")
flags.DEFINE_string("init_from", None, "Fine-tune: load params from SOURCE; fresh optimizer and step 0.")
flags.DEFINE_bool("partial", False, "With --init_from: load only parameters whose name and shape match.")
flags.DEFINE_bool("fresh", False, "Ignore checkpoints in the workdir (needs --overwrite if there are any).")
flags.DEFINE_bool("overwrite", False, "With --fresh: delete the workdir's existing checkpoints.")
flags.DEFINE_string("hf_token", None, "Hugging Face token for hf:// sources (default: $HF_TOKEN). Never stored.")
flags.DEFINE_string("coordinator_address", None, "Multi-process: HOST:PORT of process 0.")
flags.DEFINE_integer("num_processes", None, "Multi-process: number of processes.")
flags.DEFINE_integer("process_id", None, "Multi-process: this process's index.")
flags.DEFINE_integer("distributed_timeout", 300, "Multi-process: seconds to wait for the coordinator or a silent peer.")


def parse_flags(argv: list[str]) -> list[str]:
    """absl flag parsing, with user errors as one line (no usage dump)."""
    try:
        return FLAGS(argv)
    except flags.Error as e:
        fail(friendly_flag_error(str(e)))
    except FileNotFoundError as e:
        fail(f"config file {e.filename} does not exist; pass --config=configs/default.py or another file")
    except SyntaxError as e:
        fail(f"config file {e.filename} has a syntax error on line {e.lineno}: {e.msg}; fix it and run again")
    except (AttributeError, KeyError) as e:
        if isinstance(e, AttributeError) and "get_config" in str(e):
            fail(f"config file {config_argument(argv)} defines no get_config(); define get_config(arg=None) "
                 "returning a ConfigDict, as configs/default.py does")
        key = str(e.args[0]).strip("'\"") if e.args else ""
        overrides = [a.split("=")[0] for a in argv if a.startswith("--config.") and key and key in a]
        if overrides:
            fail(f"unknown config key {overrides[0]}; see docs/configuration.md for the keys")
        fail(f"invalid config override: {e}; see docs/configuration.md for the keys and their types")
    except (TypeError, ValueError) as e:
        fail(f"invalid config override: {e}; see docs/configuration.md for the keys and their types")
    return []


def config_argument(argv: list[str]) -> str:
    """The file named by --config=FILE[:ARG] or --config FILE[:ARG]."""
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            return arg.split("=", 1)[1].split(":")[0]
        if arg == "--config" and i + 1 < len(argv):
            return argv[i + 1].split(":")[0]
    return "--config"


def friendly_flag_error(message: str) -> str:
    first = message.strip().splitlines()[0]
    if "Unknown command line flag 'config." in message:
        key = first.split("'")[1]
        return f"unknown config key --{key}; see docs/configuration.md for the keys (or `--config.model.name`)"
    if "Unknown command line flag" in message:
        return f"{first}; run with --helpshort to see the flags"
    if "Error whilst parsing config file" in message:  # get_config raised: its last line says why
        cause = [line.strip() for line in message.splitlines() if line.strip()][-1]
        return f"config file {first.split('=', 1)[-1].split(':')[0]} failed to load: {cause}"
    return f"{first}; check the value's type against docs/configuration.md"


def load_config():
    """FLAGS.config, with config_flags' deferred load errors turned into one line."""
    path = (FLAGS["config"].config_filename or "").split(":")[0]
    if path and not os.path.exists(path):
        fail(f"config file {path} does not exist; pass a path like --config=configs/default.py")
    try:
        return FLAGS.config
    except OSError as e:
        detail = [line.strip() for line in str(e).splitlines() if line.strip()][-1]
        fail(f"config file {path} failed to load: {detail}")


def _ignore_abandoned_writes(unraisable) -> None:
    """After a save fails (a full disk), tensorstore finishes that save's other writes and tries to wake Orbax's
    event loop, which is already closed: harmless, and not worth a traceback per write (the failure itself is
    reported in one line)."""
    if not (isinstance(unraisable.exc_value, RuntimeError) and str(unraisable.exc_value) == "Event loop is closed"):
        sys.__unraisablehook__(unraisable)


@exits_cleanly
def main(argv: list[str]) -> None:
    del argv
    sys.unraisablehook = _ignore_abandoned_writes
    if not FLAGS["verbosity"].present:  # Orbax logs (and warns) a lot; trainkit prints its own summary lines
        logging.set_verbosity(logging.ERROR)
        # A failed background save is logged by Orbax with tracebacks, then re-raised to trainkit, which reports
        # it in one line (a full disk) or with its traceback (a bug). --verbosity=0 shows Orbax's logs again.
        logging.get_absl_logger().addFilter(lambda record: "/orbax/" not in record.pathname.replace(os.sep, "/"))
    if FLAGS.config is None or not FLAGS.workdir:
        fail("--config and --workdir are required, e.g. --config=configs/default.py --workdir=runs/digits")
    config = load_config()
    from trainkit import distributed

    distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id,
                           FLAGS.distributed_timeout)
    from trainkit.train import RunOptions, train_and_evaluate  # after distributed init: it touches devices

    options = RunOptions(
        resume_from=FLAGS.resume_from,
        init_from=FLAGS.init_from,
        partial=FLAGS.partial,
        fresh=FLAGS.fresh,
        overwrite=FLAGS.overwrite,
        hf_token=FLAGS.hf_token,
    )
    result = train_and_evaluate(config, FLAGS.workdir, options)
    if result.stopped_by is None:
        print(f"trainkit: done at step {result.step}", flush=True)


def run() -> None:
    app.run(main, flags_parser=parse_flags)


if __name__ == "__main__":
    sys.exit(run())
