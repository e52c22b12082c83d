"""Runs trained together (ntxr.train_together) are the runs they would have been apart:
the same files, losses and metrics; a NaN in one freezes only that one; a stop resumes."""

import json
import os

import numpy as np
import pytest

from ntxr import train, train_together, together

STRATEGIES = ("random", "hard_cross", "hard_audio")  # keys, the cross and an audio matrix
SEEDS = (0, 1)
SHORT = dict(num_epochs=2, max_steps_per_epoch=4)


def plan(root, tiny_config, strategies=STRATEGIES, seeds=SEEDS):
  return [(tiny_config(strategy=s, seed=seed, **SHORT), os.path.join(root, s, f"seed_{seed}"))
          for seed in seeds for s in strategies]


def read(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return results, [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def apart_and_together(tmp_path_factory, tiny_config):
  """The runs trained apart (ntxr.train) and together, each in its own root."""
  root = tmp_path_factory.mktemp("together")
  apart, joined = plan(str(root / "apart"), tiny_config), plan(str(root / "together"),
                                                              tiny_config)
  for config, workdir in apart:
    train.train_and_evaluate(config, workdir)
  returned = train_together.train_together(joined)
  return apart, joined, returned


def test_runs_trained_together_are_the_runs_trained_apart(apart_and_together):
  """Each run's files as a separate run writes them; its first epoch's training loss
  equal to 1e-5; later losses within 0.01 and test metrics within 0.03. Vmapped
  reductions round in another order (1e-7) and Adam turns a rounding-level gradient into
  a step of the learning rate (test_together), so the parameters part by about that
  much: on the tiny model's nearly collapsed audio embeddings that flips hard negatives
  chosen among near ties (a validation loss moved by 7e-4) and may swap two scores in a
  ranking, which moves R@1 on the tiny test split's 40 captions by 0.025."""
  apart, joined, returned = apart_and_together
  for (_, alone), (config, workdir), results in zip(apart, joined, returned):
    expected, expected_epochs = read(alone)
    got, epochs = read(workdir)
    assert got == results
    assert sorted(os.listdir(workdir)) == sorted(os.listdir(alone))
    assert (got["strategy"], got["epochs"], got["steps"], got["frozen"]) == (
        config.strategy, 2, 8, None)
    assert [e["epoch"] for e in epochs] == [1, 2]
    np.testing.assert_allclose(epochs[0]["training"]["loss"],
                               expected_epochs[0]["training"]["loss"], rtol=1e-5)
    for mine, theirs in zip(epochs, expected_epochs):
      for part in ("training", "validation"):
        assert mine[part]["loss"] == pytest.approx(theirs[part]["loss"], abs=0.01)
      assert mine["learning_rate"] == theirs["learning_rate"]
    for direction in ("t2a", "a2t"):
      for metric, value in expected[direction].items():
        assert abs(got[direction][metric] - value) <= 0.03, (workdir, direction, metric)
    assert got["best_epoch"] == expected["best_epoch"]


def test_a_run_whose_loss_becomes_nan_is_frozen_and_the_others_go_on(
    tmp_path, tiny_config, apart_and_together, monkeypatch):
  """Seed 1's batches carry a NaN from its sixth step (epoch 2): the seed-1 run is frozen
  there, tested from its epoch-1 checkpoint, its results say why; the seed-0 run ends
  as it does without it."""
  _, _, returned = apart_and_together
  stack, calls = together.pad_and_stack, []
  def poisoned(batches):
    calls.append(None)
    stacked = stack(batches)
    if len(calls) > 5 and len(batches) > 1:  # the sixth step on
      stacked["audio"][1] = np.nan
    return stacked
  monkeypatch.setattr(together, "pad_and_stack", poisoned)
  runs = plan(str(tmp_path), tiny_config, strategies=["hard_cross"])
  results = train_together.train_together(runs)
  clean = {(c.strategy, c.seed): r for (c, _), r in zip(plan("", tiny_config), returned)}
  for (config, workdir), got in zip(runs, results):
    _, epochs = read(workdir)
    if config.seed == 0:
      assert got["frozen"] is None
      assert got["t2a"] == clean[config.strategy, config.seed]["t2a"]
      continue
    assert "at step 6 (epoch 2" in got["frozen"] and "this run is frozen" in got["frozen"]
    assert [e["epoch"] for e in epochs] == [1] and got["best_epoch"] == 1
    assert got["steps"] == 4  # its last good checkpoint, epoch 1's


def test_a_stopped_sweep_resumes_every_run_even_from_different_steps(
    tmp_path, tiny_config, apart_and_together, monkeypatch):
  """Asked to stop at step 3, every run saves; one run's newest checkpoint is then lost,
  so the rerun finds it a step behind the others: it trains alone to its epoch's end,
  then with them, and every run ends as the uninterrupted ones."""
  _, _, returned = apart_and_together
  runs = plan(str(tmp_path), tiny_config, strategies=["hard_audio"])
  clean = {(c.strategy, c.seed): r for (c, _), r in zip(plan("", tiny_config), returned)}
  asked = train.StopRequests.asked
  monkeypatch.setattr(train.StopRequests, "asked", lambda self, step: step == 3)
  with pytest.raises(train.Stopped, match="the 2 runs stopped"):
    train_together.train_together(runs)
  monkeypatch.setattr(train.StopRequests, "asked", asked)
  behind = os.path.join(runs[1][1], "checkpoints", "latest")
  steps = sorted(int(name) for name in os.listdir(behind) if name.isdigit())
  assert steps[-1] == 3
  os.rename(os.path.join(behind, str(steps[-1])), os.path.join(str(tmp_path), "lost"))
  results = train_together.train_together(runs)
  for (config, _), got in zip(runs, results):
    assert got["steps"] == 8
    for direction in ("t2a", "a2t"):
      for metric, value in clean[config.strategy, config.seed][direction].items():
        assert got[direction][metric] == pytest.approx(value, abs=0.03)
