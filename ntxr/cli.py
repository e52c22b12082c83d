"""The flags several commands share, defined once (absl, as in the Flax examples):
`--config` (a config file whose fields `--config.FIELD=VALUE` overrides), `--workdir`,
`--strategies` and `--json`; and `start`, which every command's `main` calls first.

This module imports neither JAX nor TensorFlow, so a command's `--help` answers at once.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

# The built-in names of ntxr.sampling.STRATEGIES and ntxr.objectives.OBJECTIVES, in their
# registries' order, so that flags need no JAX; a test keeps them equal to the registries.
STRATEGY_NAMES = ("full_batch", "random", "semihard_cross", "hard_cross", "easy_text",
                  "hard_text", "easy_audio", "hard_audio")
OBJECTIVE_NAMES = ("infonce", "hn_nce", "soft", "siglip")

CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "default.py"),
    "training configuration file; any field can be set with --config.FIELD=VALUE "
    "(ntxr/configs/default.py lists them)")
WORKDIR = flags.DEFINE_string(
    "workdir", None, "a run's folder: where checkpoints, metrics and results go (ntxr.main's "
    "default: workdir/STRATEGY); the trained run that ntxr.search searches with")
JSON = flags.DEFINE_string("json", None, "also write the command's results to this JSON file")
STRATEGIES = flags.DEFINE_list(
    "strategies", [], "negative-sampling strategies, or objectives, to run (default: every "
    f"strategy: {','.join(STRATEGY_NAMES)}; objectives: {','.join(OBJECTIVE_NAMES)})")


def start(argv) -> None:
  """What every command does first: refuses stray arguments, and keeps the libraries'
  INFO logs (checkpoints, TensorFlow's C++ banner) quiet unless --verbosity is given."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")  # read when TensorFlow loads


def import_tensorflow() -> None:
  """Imports TensorFlow, with the lines its C++ libraries print as they load (the oneDNN
  banner, which TF_CPP_MIN_LOG_LEVEL no longer silences) sent nowhere unless --verbosity
  is given. Call it before anything imports TensorFlow; errors still surface as
  Python exceptions."""
  if "tensorflow" in sys.modules or flags.FLAGS["verbosity"].present:
    import tensorflow  # pylint: disable=import-outside-toplevel,unused-import
    return
  sys.stderr.flush()
  saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
  try:
    os.dup2(devnull, 2)
    import tensorflow  # pylint: disable=import-outside-toplevel,unused-import,redefined-outer-name
  finally:
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def strategies() -> list:
  """The --strategies chosen, checked against the names (default: every strategy)."""
  known = STRATEGY_NAMES + OBJECTIVE_NAMES
  unknown = sorted(set(STRATEGIES.value) - set(known))
  if unknown:
    raise ValueError(f"unknown strategies {unknown}; choose from {list(known)}")
  return list(STRATEGIES.value or STRATEGY_NAMES)
