"""The flags several commands share, defined once (absl, as in the Flax examples):
`--config` (a config file whose fields `--config.FIELD=VALUE` overrides), `--workdir`,
`--strategies` and `--json`.

This module imports neither JAX nor TensorFlow, so a command's `--help` answers at once.
"""

import os
import sys

from absl import flags
from ml_collections import config_flags

from ntxr import command

# The built-in names of ntxr.sampling.STRATEGIES and ntxr.objectives.OBJECTIVES, in their
# registries' order, so that flags need no JAX; a test keeps them equal to the registries.
STRATEGY_NAMES = ("full_batch", "random", "semihard_cross", "hard_cross", "easy_text",
                  "hard_text", "easy_audio", "hard_audio")
OBJECTIVE_NAMES = ("infonce", "hn_nce", "soft", "siglip")

try:  # the default file's fields are overridden from the command line here, at import
  CONFIG = config_flags.DEFINE_config_file(
      "config", os.path.join(os.path.dirname(__file__), "configs", "default.py"),
      "training configuration file; any field can be set with --config.FIELD=VALUE "
      "(ntxr/configs/default.py lists them)")
except (AttributeError, KeyError) as error:  # a --config.FIELD that names no field
  command.unknown_field(error, sys.argv)
WORKDIR = flags.DEFINE_string(
    "workdir", None, "a run's folder: where checkpoints, metrics and results go (ntxr.main's "
    "default: workdir/STRATEGY); the trained run that ntxr.search searches with")
JSON = flags.DEFINE_string("json", None, "also write the command's results to this JSON file")
STRATEGIES = flags.DEFINE_list(
    "strategies", [], "negative-sampling strategies, or objectives, to run (default: every "
    f"strategy: {','.join(STRATEGY_NAMES)}; objectives: {','.join(OBJECTIVE_NAMES)})")


def strategies() -> list:
  """The --strategies chosen, checked against the names (default: every strategy)."""
  known = STRATEGY_NAMES + OBJECTIVE_NAMES
  unknown = sorted(set(STRATEGIES.value) - set(known))
  if unknown:
    raise ValueError(f"unknown strategies {unknown}; choose from {list(known)}")
  return list(STRATEGIES.value or STRATEGY_NAMES)
