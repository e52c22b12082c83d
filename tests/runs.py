"""Helpers for tests of training runs: a checkpoint's parameters, faults injected into
the training batches, a run stopped by SIGTERM, results flattened for comparison, the
runs trained together and how they compare with the same runs trained apart."""

import json
import os
import re
import signal

import numpy as np
import pytest

from ntxr import checkpoints as checkpoints_lib, experiment as experiment_lib, settings, train
from ntxr.data import input_pipeline


# Runs trained apart and together: random draws keys, hard_cross reads the cross matrix
# and hard_audio an audio-audio one; one epoch of four steps each.
TOGETHER_STRATEGIES = ("random", "hard_cross", "hard_audio")
TOGETHER_SEEDS = (0, 1)
SHORT = dict(num_epochs=1, max_steps_per_epoch=4)


def experiment_of(config, devices=None) -> experiment_lib.Experiment:
  """The Experiment of a config's settings, its corpus prepared first."""
  return experiment_lib.Experiment.of(settings.Settings.of(config), devices)


def together_plan(root: str, tiny_config, strategies=TOGETHER_STRATEGIES,
                  seeds=TOGETHER_SEEDS, **overrides) -> list:
  """[(config, workdir)] of strategies x seeds, seed by seed: tiny_config with SHORT and
  the overrides."""
  return [(tiny_config(strategy=s, seed=seed, **{**SHORT, **overrides}),
           os.path.join(root, s, f"seed_{seed}")) for seed in seeds for s in strategies]


def read(workdir):
  """(results.json, metrics.jsonl's records) of a finished run."""
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return results, [json.loads(line) for line in f]


def assert_same_run(workdir, alone):
  """The run in workdir is the run in `alone`: its epochs' training losses equal to
  1e-5, validation losses within 1e-3 and test metrics within 0.03 (why so:
  test_train_together.test_runs_trained_together_are_the_runs_trained_apart)."""
  expected, expected_epochs = read(alone)
  got, epochs = read(workdir)
  assert len(epochs) == len(expected_epochs)
  for epoch, expected_epoch in zip(epochs, expected_epochs):
    np.testing.assert_allclose(epoch["training"]["loss"], expected_epoch["training"]["loss"],
                               rtol=1e-5)
    assert epoch["validation"]["loss"] == pytest.approx(expected_epoch["validation"]["loss"],
                                                        abs=1e-3)
    assert epoch["learning_rate"] == expected_epoch["learning_rate"]
  for direction in ("t2a", "a2t"):
    for metric, value in expected[direction].items():
      assert abs(got[direction][metric] - value) <= 0.03, (workdir, direction, metric)


def flat(tree, path="") -> dict:
  """{"a/b/0": leaf} of nested dicts and lists."""
  if isinstance(tree, (dict, list)):
    items = tree.items() if isinstance(tree, dict) else enumerate(tree)
    return {name: leaf for key, value in items for name, leaf in flat(value, f"{path}/{key}").items()}
  return {path: tree}


def timeless(results: dict) -> dict:
  """A run's results.json less what two runs of one setting differ in: its seconds and
  the date in its provenance."""
  provenance = {k: v for k, v in results["provenance"].items() if k != "date"}
  return {**{k: v for k, v in results.items() if k != "seconds"}, "provenance": provenance}


def params_of(workdir, which="latest", field="params"):
  """(step, params) of the workdir's `which` checkpoint, read as raw arrays (or another
  field of its train state: "memory")."""
  with checkpoints_lib.Checkpoints(workdir) as checkpoints:
    manager = checkpoints.managers[which]
    step = manager.latest_step()
    restored = manager.restore(step)  # raw arrays, no target structure needed
  return step, restored["state"][field]


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


def stop_at_step_12(config, workdir, monkeypatch):
  """Trains until SIGTERM asks it to stop; returns the Stopped. (Ctrl-C through the
  command: test_cli.py.)"""
  handlers = {number: signal.getsignal(number) for number in (signal.SIGTERM, signal.SIGINT)}
  with monkeypatch.context() as m:
    # The signal while batch 13 is fetched: prefetched, so while step 11 runs, before step
    # 12 is dispatched; training stops after step 12, the step in flight when it next asks.
    interrupt_after(m, 12, how="sigterm")
    with pytest.raises(train.Stopped, match=re.escape(
        f"as asked (SIGTERM or a preemption notice), training stopped after step 12 "
        f"(epoch 1), saved in {workdir}/checkpoints/latest: rerun the same command to "
        "resume")) as stopped:
      train.train_and_evaluate(config, str(workdir))
  assert {n: signal.getsignal(n) for n in handlers} == handlers  # the handlers are training's only
  assert params_of(str(workdir))[0] == 12
  return stopped.value
