"""Command line entry: `python -m jaxprune.main --config=configs/cifar10.py --workdir=runs/cifar10`.

Config values are overridden with `--config.train.epochs=5`; an unknown key or a value of the
wrong type stops with an error before anything runs. Running the same command on the same
workdir again resumes: finished phases are skipped, an interrupted one continues.
"""
import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Path to a config file in configs/ (e.g. configs/cifar10.py or configs/cifar10.py:smoke).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")
_QUIET = flags.DEFINE_bool("quiet", False, "No progress bars or tables on the terminal.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {' '.join(argv[1:])}")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO
    from jaxprune import pipeline  # after flag parsing, so --help is fast

    try:
        pipeline.run(_CONFIG.value, _WORKDIR.value, progress=not _QUIET.value)
    except pipeline.USER_ERRORS as e:  # bad input: one clear message, no traceback
        print(f"jaxprune: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    app.run(main)
