"""The flags several commands share, defined once (absl, as in the Flax examples):
`--config` (a config file whose fields `--config.FIELD=VALUE` overrides), `--workdir`
and `--strategies`. Each command defines its own few flags beside its `main`."""

import os

from absl import flags
from ml_collections import config_flags

from ntxr import sampling

CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "default.py"),
    "training configuration file; any field can be set with --config.FIELD=VALUE "
    "(ntxr/configs/default.py lists them)")
WORKDIR = flags.DEFINE_string(
    "workdir", None, "where checkpoints, metrics and results go (default: workdir/STRATEGY)")
STRATEGIES = flags.DEFINE_list(
    "strategies", [], f"negative-sampling strategies (default: all: {','.join(sampling.STRATEGIES)})")


def strategies() -> list:
  """The --strategies chosen, checked against the registry (default: all)."""
  return [sampling.get_strategy(name).name for name in STRATEGIES.value or sampling.STRATEGIES]
