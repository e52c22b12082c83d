"""The flags several commands share, defined once (absl, as in the Flax examples):
`--config` (a config file whose fields `--config.FIELD=VALUE` overrides), `--workdir`,
`--strategies` and `--json`. Each command defines its own few flags beside its `main`."""

import os

from absl import flags
from ml_collections import config_flags

from ntxr import objectives, sampling

CONFIG = config_flags.DEFINE_config_file(
    "config", os.path.join(os.path.dirname(__file__), "configs", "default.py"),
    "training configuration file; any field can be set with --config.FIELD=VALUE "
    "(ntxr/configs/default.py lists them)")
WORKDIR = flags.DEFINE_string(
    "workdir", None, "a run's folder: where checkpoints, metrics and results go (ntxr.main's "
    "default: workdir/STRATEGY); the trained run that ntxr.search searches with")
JSON = flags.DEFINE_string("json", None, "also write the command's results to this JSON file")
STRATEGIES = flags.DEFINE_list(
    "strategies", [], "negative-sampling strategies, or objectives (ntxr.objectives), to "
    f"run (default: every strategy: {','.join(sampling.STRATEGIES)})")


def strategies() -> list:
  """The --strategies chosen, checked against the registries (default: every strategy)."""
  unknown = sorted(set(STRATEGIES.value) - set(objectives.SETTINGS))
  if unknown:
    raise ValueError(f"unknown strategies {unknown}; choose from {list(objectives.SETTINGS)}")
  return list(STRATEGIES.value or sampling.STRATEGIES)
