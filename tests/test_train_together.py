"""Runs trained together (ntxr.train.train_runs) are the runs they would have been apart:
the same files, losses and metrics; a NaN in one freezes only that one; a stop resumes;
what would not fit a device is refused. (Eight devices against one: test_parallel.)"""

import contextlib
import copy
import os
import re
import shutil
import signal

import jax
import numpy as np
import pytest

from runs import SHORT, TOGETHER_SEEDS, assert_same_run, experiment_of, read, together_plan
from ntxr import experiment as experiment_lib, parallel, programs, settings, sweep, train
from ntxr import together


def test_runs_trained_together_are_the_runs_trained_apart(apart_and_together, tmp_path):
  """Each run's files as a separate run writes them; its epoch's training loss equal to
  1e-5; its validation loss within 1e-3 and test metrics within 0.03. Vmapped
  reductions round in another order (1e-7) and Adam turns a rounding-level gradient into
  a step of the learning rate (test_together), so the parameters part by about that
  much. On a 2-core x86 CPU the training losses agree to 3e-8, the validation losses to
  1.0e-4 (hard_audio, seed 0; 0 to 8e-7 for the others) and the test metrics exactly:
  the validation bound is ten times that gap. The metrics' bound admits one swap of two
  scores, which another CPU's rounding order can make on the tiny model's nearly
  collapsed audio embeddings, where scores sit in near ties: a swap moves R@1 on the tiny
  test split's 40 captions by 0.025 and mAP by at most half that. Below 0.025 the test
  would fail on rounding, not on a run that differs."""
  apart, joined = apart_and_together
  for (_, alone), (config, workdir) in zip(apart, joined):
    got, _ = read(workdir)
    assert sorted(os.listdir(workdir)) == sorted(os.listdir(alone))
    assert (got["strategy"], got["epochs"], got["steps"], got["frozen"]) == (
        config.strategy, 1, 4, None)
    assert_same_run(workdir, alone)
  # What reads a run reads these: --eval_only tests the best checkpoint to the same table.
  config, workdir = joined[0]
  copy = shutil.copytree(workdir, tmp_path / "run")
  again = train.evaluate_only(config, str(copy))
  assert (again["t2a"], again["a2t"]) == (read(workdir)[0]["t2a"], read(workdir)[0]["a2t"])


def test_runs_trained_together_differ_only_in_strategy_objective_and_seed(tiny_config):
  config = tiny_config(data_dir="~/clotho")
  other = tiny_config(data_dir=os.path.expanduser("~/clotho/"), seed=1, strategy="hard_cross",
                      objective="infonce")
  settings.check_together([config, other])  # the same folder, however it is written
  other.batch_size = 16
  with pytest.raises(settings.SettingError, match=re.escape(
      "differ only in strategy, objective, seed; --config.batch_size is 8 in one and 16")):
    settings.check_together([config, other])


def first_epochs(runs) -> dict:
  """{(strategy, seed): the first epoch's metrics.jsonl record} of finished runs."""
  return {(config.strategy, config.seed): read(workdir)[1][0] for config, workdir in runs}


def test_a_run_whose_loss_becomes_nan_is_frozen_and_the_others_go_on(
    tmp_path, tiny_config, apart_and_together, monkeypatch):
  """A sweep's runs trained together (sweep.run_together) for two epochs, seed 1's
  training batches carrying a NaN from its sixth step (epoch 2): the seed-1 run is
  frozen there, tested from its epoch-1 checkpoint, its results say why; the seed-0 run
  trains on, its first epoch that of the clean runs trained together."""
  clean = first_epochs(apart_and_together[1])
  step = programs.Stacked.step
  def poisoned(program, batch, number):
    if number >= 6:  # seed 1's batch
      audio = batch["audio"].copy()
      audio[[run.seed for run in program.runs].index(1)] = np.nan
      batch = dict(batch, audio=audio)
    step(program, batch, number)
  monkeypatch.setattr(programs.Stacked, "step", poisoned)
  reported = []
  failed = sweep.run_together(sweep.plan(str(tmp_path), ["hard_cross"], TOGETHER_SEEDS),
                              tiny_config(**dict(SHORT, num_epochs=2)), report=reported.append)
  assert failed == [] and reported[0] == "0 of 2 runs finished already; 2 to train together"
  assert reported[1].startswith("hard_cross seed 0: done; results in")
  assert reported[2].startswith("hard_cross seed 1: frozen: training loss became")
  assert "at step 6 (epoch 2" in reported[2]
  for config, workdir in together_plan(str(tmp_path), tiny_config, ["hard_cross"],
                                       num_epochs=2):
    got, epochs = read(workdir)
    if config.seed == 0:
      assert (got["frozen"], got["steps"], [e["epoch"] for e in epochs]) == (None, 8, [1, 2])
      assert epochs[0]["training"] == clean["hard_cross", 0]["training"]
      continue
    assert "at step 6 (epoch 2" in got["frozen"] and "this run is frozen" in got["frozen"]
    assert [e["epoch"] for e in epochs] == [1] and got["best_epoch"] == 1
    assert got["steps"] == 4  # its last good checkpoint, epoch 1's


def test_runs_validated_together_are_validated_as_apart_and_a_nan_freezes_one(
    apart_and_together, tmp_path):
  """The together runs' validation (their states stacked, one vmapped loss program, one embedding
  pass, one scoring program per block) gives each run the loss, embeddings and scores of its
  own validation, to 1e-5, with the same draws every epoch and with each epoch's own; a run
  whose parameters became NaN gets its error (the loop freezes it), the other is validated."""
  # The random strategy's runs: their losses read each run's own key, and no near tie
  # among hard negatives can flip with the order of a vmapped sum (test_together).
  runs = [(config, shutil.copytree(workdir, tmp_path / os.path.basename(workdir)))
          for config, workdir in apart_and_together[1] if config.strategy == "random"]
  with contextlib.ExitStack() as stack:
    members = [train._open(experiment_of(config), config, str(workdir), stack, several=True)
               for config, workdir in runs]
    validated = programs.Stacked(members).validate(1)
    experiment = members[0].experiment
    evaluation = experiment.evaluation
    splits = evaluation.embed_split_runs(together.stack([run.state for run in members]),
                                         experiment.validation_split)
    scored = evaluation.runs_scores(splits)
    for run, (results, collapse, seconds), split, s in zip(members, validated, splits, scored):
      alone = run.experiment.evaluation.embed_split(run.state, experiment.validation_split)
      alone_scores = run.experiment.evaluation.runs_scores([alone])[0]
      np.testing.assert_allclose(s, alone_scores, rtol=1e-5, atol=1e-6)
      for name in ("audio", "text"):
        np.testing.assert_allclose(getattr(split, name), getattr(alone, name), rtol=1e-5,
                                   atol=1e-6)
      for name in ("audio_mask", "clip_ids", "text_mask", "caption_ids"):
        np.testing.assert_array_equal(getattr(split, name), getattr(alone, name))
      assert results["loss"] == pytest.approx(run.experiment.validation_loss(run.state, 1),
                                              rel=1e-5)
      expected = run.experiment.evaluation.validation_results(
          results["loss"], alone, alone_scores, run.progress.statistic_means())[1]
      assert (collapse.audio_cosine, collapse.text_cosine) == pytest.approx(
          (expected.audio_cosine, expected.text_cosine), rel=1e-4)
      assert seconds > 0 and run.frozen is None
    # With per-epoch draws each run reads its own seed's shuffle of the validation split:
    # the runs' different batches padded to the longest and stacked.
    for run, (config, _) in zip(members, runs):
      config = copy.deepcopy(config)
      config.validation_draws = "per_epoch"
      run.experiment = experiment_of(config)
    per_epoch = [results["loss"] for results, _, _ in programs.Stacked(members).validate(2)]
    assert per_epoch == pytest.approx([run.experiment.validation_loss(run.state, 2)
                                       for run in members], rel=1e-5)
    assert all(loss != pytest.approx(fixed[0]["loss"], rel=1e-5)
               for loss, fixed in zip(per_epoch, validated))
    members[1].state = members[1].state.replace(params=jax.tree.map(
        lambda leaf: leaf * np.nan, members[1].state.params))
    first, second = programs.Stacked(members).validate(2)
    assert first[0]["loss"] == pytest.approx(per_epoch[0], rel=1e-6)
    assert isinstance(second, FloatingPointError)
    assert str(second).startswith("the model's embeddings became NaN or infinite")


def test_a_stopped_sweep_resumes_every_run_even_from_different_steps(
    tmp_path, tiny_config, apart_and_together, monkeypatch):
  """Two epochs, asked to stop at step 3: every run saves. One run's newest checkpoint
  is then lost, so the rerun finds it three steps behind the other: it trains alone to
  its epoch's end, the other its last step alone, then the two train epoch 2 together.
  Their first epochs are those of the runs never stopped."""
  clean = first_epochs(apart_and_together[1])
  runs = together_plan(str(tmp_path), tiny_config, ["hard_audio"], num_epochs=2)
  asked = train.StopRequests.asked
  monkeypatch.setattr(train.StopRequests, "asked", lambda self, step: step == 3)
  with pytest.raises(train.Stopped, match="the 2 runs stopped"):
    train.train_runs(runs)
  monkeypatch.setattr(train.StopRequests, "asked", asked)
  behind = os.path.join(runs[1][1], "checkpoints", "latest")
  assert sorted(int(name) for name in os.listdir(behind) if name.isdigit()) == [3]
  os.rename(os.path.join(behind, "3"), os.path.join(str(tmp_path), "lost"))
  sizes, program_of = [], programs.of
  def record(runs):
    sizes.append([run.seed for run in runs])
    return program_of(runs)
  monkeypatch.setattr(programs, "of", record)
  results = train.train_runs(runs)
  assert sizes == [[1], [0], [0, 1]]
  for (config, workdir), got in zip(runs, results):
    assert (got["epochs"], got["steps"]) == (2, 8)
    first = read(workdir)[1][0]
    expected = clean[config.strategy, config.seed]
    np.testing.assert_allclose(first["training"]["loss"], expected["training"]["loss"],
                               rtol=1e-5)
    assert first["validation"]["loss"] == pytest.approx(expected["validation"]["loss"],
                                                        abs=1e-3)


def test_a_stop_saves_again_only_the_runs_that_moved_since_their_last_save(
    tmp_path, tiny_config, monkeypatch):
  """Stopped at step 3, then one run's checkpoint lost: the rerun, stopped while that run
  is validated after stepping alone through its epoch, saves it and leaves the other's
  checkpoint, which holds that run's state already, as it was."""
  runs = together_plan(str(tmp_path), tiny_config, ["hard_audio"])
  with monkeypatch.context() as m:
    m.setattr(train.StopRequests, "asked", lambda self, step: step == 3)
    with pytest.raises(train.Stopped):
      train.train_runs(runs)
  waiting, behind = (os.path.join(workdir, "checkpoints", "latest") for _, workdir in runs)
  shutil.rmtree(os.path.join(behind, "3"))
  saved = os.stat(os.path.join(waiting, "3"))
  validate = experiment_lib.Experiment.validate
  def terminated_validation(self, state, training, epoch):
    os.kill(os.getpid(), signal.SIGTERM)
    return validate(self, state, training, epoch)
  monkeypatch.setattr(experiment_lib.Experiment, "validate", terminated_validation)
  with pytest.raises(train.Stopped):
    train.train_runs(runs)
  kept = os.stat(os.path.join(waiting, "3"))
  assert (kept.st_ino, kept.st_mtime_ns) == (saved.st_ino, saved.st_mtime_ns)
  assert [name for name in os.listdir(behind) if name.isdigit()] == ["4"]


def test_a_stop_names_where_each_run_stopped(tmp_path, tiny_config, monkeypatch):
  """Stopped together at step 3, the runs stopped at one point; then one run's checkpoint
  lost, the rerun stopped as that run steps alone (its step 1): at two, each named."""
  runs = together_plan(str(tmp_path), tiny_config, ["hard_audio"])
  monkeypatch.setattr(train.StopRequests, "asked", lambda self, step: step == 3)
  with pytest.raises(train.Stopped) as stopped:
    train.train_runs(runs)
  resume = "rerun the same command to resume them from there"
  assert str(stopped.value) == (
      "as asked (SIGTERM or a preemption notice), the 2 runs stopped after step 3 (epoch 1), "
      f"each saved in its workdir's checkpoints/latest: {resume}")
  shutil.rmtree(os.path.join(runs[1][1], "checkpoints", "latest", "3"))
  monkeypatch.setattr(train.StopRequests, "asked", lambda self, step: step == 1)
  with pytest.raises(train.Stopped) as stopped:
    train.train_runs(runs)
  assert str(stopped.value) == (
      "as asked (SIGTERM or a preemption notice), the 2 runs stopped at different points, "
      "each saved in its workdir's checkpoints/latest: hard_audio seed 0 after step 3 "
      f"(epoch 1); hard_audio seed 1 after step 1 (epoch 1). {resume.capitalize()}")


def test_runs_that_would_not_fit_a_device_are_refused_naming_a_group_size_that_fits(
    tiny_config, monkeypatch):
  """With a device said to hold 2.5 runs' estimated bytes (over 0.9), six runs of one
  strategy are refused before anything is written, naming two as the group size that
  fits; in groups of two they pass. One run's state is its parameters, Adam's two moments
  (three times the parameters), the BatchNorm statistics and a few scalars."""
  experiments = [experiment_of(config) for config, _ in together_plan(
      "unused", tiny_config, ["hard_cross"], seeds=range(6))]
  state = experiments[0].initial_state
  params = sum(leaf.nbytes for leaf in jax.tree.leaves(state.params))
  statistics = sum(leaf.nbytes for leaf in jax.tree.leaves(state.batch_stats))
  state_bytes, step_bytes = programs.run_bytes(experiments[0])
  assert 3 * params + statistics < state_bytes < 3 * params + statistics + 1024
  assert step_bytes > 0
  one = state_bytes + step_bytes
  monkeypatch.setattr(parallel, "device_memory", lambda device: int(2.5 * one / 0.9))
  with pytest.raises(settings.SettingError, match=re.escape(
      f"6 runs of hard_cross trained together need about {6 * one / 2**30:.1f} GiB of each "
      f"device's {2.5 * one / 0.9 / 2**30:.1f} GiB: train at most 2 together "
      "(--group_size=2)")):
    programs.check_memory(experiments, 0)
  programs.check_memory(experiments, 2)
  monkeypatch.setattr(parallel, "device_memory", lambda device: None)  # the CPU's
  programs.check_memory(experiments, 0)
