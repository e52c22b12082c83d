"""Helpers for tests of training runs: a checkpoint's parameters, faults injected into
the training batches, results flattened for comparison, the runs trained together."""

import os
import signal

import numpy as np

from ntxr import checkpoints as checkpoints_lib
from ntxr.data import input_pipeline


# Runs trained apart and together: random draws keys, hard_cross reads the cross matrix
# and hard_audio an audio-audio one; one epoch of four steps each.
TOGETHER_STRATEGIES = ("random", "hard_cross", "hard_audio")
TOGETHER_SEEDS = (0, 1)
SHORT = dict(num_epochs=1, max_steps_per_epoch=4)


def together_plan(root: str, tiny_config, strategies=TOGETHER_STRATEGIES,
                  seeds=TOGETHER_SEEDS, **overrides) -> list:
  """[(config, workdir)] of strategies x seeds, seed by seed: tiny_config with SHORT and
  the overrides."""
  return [(tiny_config(strategy=s, seed=seed, **{**SHORT, **overrides}),
           os.path.join(root, s, f"seed_{seed}")) for seed in seeds for s in strategies]


def flat(tree, path="") -> dict:
  """{"a/b/0": leaf} of nested dicts and lists."""
  if isinstance(tree, (dict, list)):
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    return {name: leaf for key, value in items for name, leaf in flat(value, f"{path}/{key}").items()}
  return {path: tree}


def params_of(workdir, which="latest"):
  """(step, params) of the workdir's `which` checkpoint, read as raw arrays."""
  with checkpoints_lib.Checkpoints(workdir) as checkpoints:
    manager = checkpoints.managers[which]
    step = manager.latest_step()
    restored = manager.restore(step)  # raw arrays, no target structure needed
  return step, restored["state"]["params"]


def interrupt_after(monkeypatch, batches: int, how: str):
  """After `batches` training batches of the first epoch: "nan" turns the batches NaN,
  "sigterm" sends this process SIGTERM (while the next batch is fetched)."""
  real = input_pipeline.as_numpy
  def as_numpy(ds):
    for i, batch in enumerate(real(ds)):
      if "tokens" in batch and "audio_mask" in batch and i >= batches:
        if how == "nan":
          batch = dict(batch, audio=np.full_like(batch["audio"], np.nan))
        if how == "sigterm" and i == batches:
          os.kill(os.getpid(), signal.SIGTERM)
      yield batch
  monkeypatch.setattr(input_pipeline, "as_numpy", as_numpy)
