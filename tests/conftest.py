"""Shared fixtures: tiny configs on a tiny synthetic corpus, and a tiny sweep of them."""

import os

import pytest

from ntxr import sweep, train
from ntxr.configs import default

TINY = dict(size="tiny", batch_size=8, num_epochs=2, channels=(4, 8, 8, 8, 8), embed_dim=16,
            vocab_size=60, checkpoint_every_steps=2, eval_batch_size=8)
SWEEP_STRATEGIES = ("random", "semihard_cross", "hard_cross")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def tiny_config(cache_dir):
  """tiny_config(**overrides): the default config shrunk to seconds of training."""
  def make(**overrides):
    config = default.get_config()
    config.update(dict(TINY, cache_dir=cache_dir, **overrides))
    return config
  return make


@pytest.fixture(scope="session")
def tiny_flags(cache_dir):
  """tiny_flags(**overrides): the same shrunk config as `ntxr.main` flags."""
  def make(**overrides):
    return [f"--config.{field}={value}"
            for field, value in dict(TINY, cache_dir=cache_dir, **overrides).items()]
  return make


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory, tiny_config):
  """A sweep root with SWEEP_STRATEGIES x seeds 0 and 1 trained in this process."""
  root = str(tmp_path_factory.mktemp("sweep"))
  for run in sweep.plan(root, SWEEP_STRATEGIES, [0, 1]):
    train.train_and_evaluate(tiny_config(strategy=run.strategy, seed=run.seed), run.workdir)
  return root


@pytest.fixture(scope="session")
def tiny_run(tiny_sweep):
  """The workdir of a finished run of tiny_config() (semihard_cross, seed 0), trained
  once for the whole session: the tiny sweep's."""
  return os.path.join(tiny_sweep, "semihard_cross", "seed_0")
