"""The training loop on a tiny synthetic corpus: end to end, NaN, frozen vectors, the
authors' training score, objectives. What the workdir survives: test_workdir.py."""

import collections
import csv
import functools
import json
import os
import pathlib
import re
import shutil

import jax
import numpy as np
import optax
import pytest

from ntxr import checkpoints as checkpoints_lib, dcase, experiment as experiment_lib
from ntxr import programs, relevance, settings, steps, train
from ntxr.configs import default
from ntxr.bench import reference
from ntxr.data import input_pipeline
from runs import experiment_of, interrupt_after, params_of, timeless
import test_relevance


def tensorboard_scalars(folder: pathlib.Path) -> dict:
  """{tag: {step: value}} from the event files in folder."""
  import tensorflow as tf  # pylint: disable=import-outside-toplevel
  found = {}
  for path in sorted(folder.iterdir()):
    for record in tf.data.TFRecordDataset(str(path)).as_numpy_iterator():
      event = tf.compat.v1.Event.FromString(record)
      for value in event.summary.value:
        found.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
  return found


def test_tiny_run_end_to_end(tiny_config, tiny_run):
  config, tmp_path = tiny_config(), pathlib.Path(tiny_run)
  results = json.loads((tmp_path / "results.json").read_text())
  assert results["strategy"] == "semihard_cross" and results["epochs"] == 2
  assert results["steps"] == 30 and results["split"] == "evaluation"  # 2 x 24 clips x 5 / 8
  for direction, keys in [("t2a", ["R@1", "R@5", "R@10", "mAP@10", "mAP"]),
                          ("a2t", ["R@1", "R@5", "R@10", "HR@1", "HR@5", "HR@10",
                                   "mAP@10", "mAP"])]:
    assert sorted(results[direction]) == sorted(keys)
    assert all(0 <= results[direction][k] <= 1 for k in keys)
  histogram = results["score_histogram"]  # 8 clips x 40 captions, 40 of the pairs matching
  assert (sum(histogram["positive"]), sum(histogram["negative"])) == (40, 280)
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  assert [l["epoch"] for l in lines] == [1, 2]
  assert {"share_zero_loss", "share_at_margin", "positive_mean"} <= set(lines[0]["training"])
  assert {"audio_cosine", "text_effective_rank", "collapsed", "reasons"} <= set(
      lines[0]["collapse"])
  assert set(lines[0]["validation"]) == {"loss", "t2a", "a2t"}
  scalars = tensorboard_scalars(tmp_path / "tensorboard")
  for tag, value in (("training/loss", lambda line: line["training"]["loss"]),
                     ("validation/t2a/mAP@10", lambda line: line["validation"]["t2a"]["mAP@10"])):
    assert scalars[tag] == pytest.approx({15: value(lines[0]), 30: value(lines[1])})
  assert "collapse/reasons" not in scalars and "collapse/collapsed" not in scalars
  # Rerunning a finished run trains nothing more and tests the same best checkpoint.
  again = train.train_and_evaluate(config, str(tmp_path))
  assert again["steps"] == results["steps"] and again["t2a"] == results["t2a"]
  assert timeless(again) == timeless(results)  # tested again, written anew: its own date
  assert again["provenance"]["date"] >= results["provenance"]["date"]
  # What it returns is what it wrote.
  assert json.loads(json.dumps(again)) == json.loads((tmp_path / "results.json").read_text())
  assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
  assert train.evaluate_only(config, str(tmp_path))["a2t"] == results["a2t"]


def test_a_run_scores_several_matching_clips_per_caption_as_dcase_2025(tiny_config, tiny_run):
  """The built-in corpus's relevance file names, for each test caption, the clips with its
  clip's exact event kinds; the run's t2a_multi is DCASE 2025's scoring of its own score
  matrix, computed here query by query, and results.json says what it was judged
  against."""
  corpus = pathlib.Path(tiny_config().cache_dir) / "synthetic_tiny"
  events = json.loads((corpus / "ntxr_events.json").read_text())["evaluation"]
  expected = {}
  with open(corpus / "clotho_captions_evaluation.csv", newline="") as f:
    for row in list(csv.reader(f))[1:]:
      for text in row[1:]:
        expected.setdefault(text, set()).update(
            name for name, kinds in events.items() if kinds == events[row[0]])
  relevant = relevance.read_dcase2025(str(corpus / relevance.DCASE2025_FILE))
  assert {q: set(f) for q, f in relevant.items()} == expected
  assert max(len(f) for f in expected.values()) > 1  # some captions match several clips
  results = json.loads((pathlib.Path(tiny_run) / "results.json").read_text())
  assert results["judged_against"] == {"t2a_multi": "built-in corpus events"}
  with open(pathlib.Path(tiny_run) / "dcase2025_evaluation.csv", newline="") as f:
    header, *rows = list(csv.reader(f))
  ranked = {row[0]: [header[1 + j] for j in np.argsort(-np.array(row[1:], float),
                                                       kind="stable")] for row in rows}
  assert sorted(ranked) == sorted(expected)
  assert results["t2a_multi"].pop("queries") == len(expected)
  assert results["t2a_multi"] == pytest.approx(test_relevance.loop_metrics(relevant, ranked),
                                               abs=1e-12)


def test_results_name_the_peoples_file_t2a_multi_was_judged_against(tiny_config, tiny_run,
                                                                     tmp_path, caplog):
  """With --config.relevance_file on the built-in corpus, results.json names that file,
  not the corpus's events, and t2a_multi is scored against it: two captions, each judged
  to match all 8 test clips, so any ranking has AP 1, R@k = k / 8 and HR@k = 1. A third
  judged caption, not one of the split's, is left out with a warning."""
  corpus = pathlib.Path(tiny_config().cache_dir) / "synthetic_tiny"
  with open(corpus / "clotho_captions_evaluation.csv", newline="") as f:
    rows = list(csv.reader(f))[1:]
  assert len(rows) == 8
  people = str(tmp_path / "people.csv")
  relevance.write_dcase2025(people, {rows[0][1]: [r[0] for r in rows],
                                     rows[1][1]: [r[0] for r in rows],
                                     "a caption of another split": [rows[2][0]]})
  workdir = shutil.copytree(tiny_run, tmp_path / "run")
  results = train.evaluate_only(tiny_config(relevance_file=people), str(workdir))
  assert json.loads((workdir / "results.json").read_text()) == json.loads(json.dumps(results))
  assert results["judged_against"] == {"t2a_multi": people}
  assert results["t2a_multi"] == {"mAP@16": 1.0, "mAP@10": 1.0, "R@1": 1 / 8, "R@5": 5 / 8,
                                  "R@10": 1.0, "HR@1": 1.0, "HR@5": 1.0, "HR@10": 1.0,
                                  "queries": 2}
  assert ("t2a_multi: 1 of the 3 judged captions are not captions of the evaluation split"
          in caplog.text)
  # The built-in corpus's own file again: its events are named, not its path.
  again = train.evaluate_only(tiny_config(), str(workdir))
  assert again["judged_against"] == {"t2a_multi": "built-in corpus events"}


def test_the_reported_epoch_and_the_collapse_flags_follow_the_metrics_log(tiny_config, tiny_run):
  """results.json against metrics.jsonl: the best epoch is the first with the highest
  validation t2a mAP@10, and the flagged epochs are those whose signals cross the
  config's thresholds (the validation side recomputed here)."""
  config, tmp_path = tiny_config(), pathlib.Path(tiny_run)
  results = json.loads((tmp_path / "results.json").read_text())
  lines = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  selection = [line["validation"]["t2a"]["mAP@10"] for line in lines]
  assert results["selected_by"] == "t2a_mAP@10"
  assert results["best_epoch"] == 1 + int(np.argmax(selection))
  thresholds = config.collapse
  for line in lines:
    signals = line["collapse"]
    crossed = [name for name in ("audio_cosine", "text_cosine")
               if signals[name] > thresholds.cosine]
    crossed += [name for name in ("audio_effective_rank", "text_effective_rank")
                if signals[name] < thresholds.effective_rank]
    assert all(any(r.startswith(name) for r in signals["reasons"]) for name in crossed)
    assert signals["collapsed"] == bool(signals["reasons"])
  flagged = [line["epoch"] for line in lines if line["collapse"]["collapsed"]]
  assert results["collapse_epochs"] == flagged
  assert results["collapse"] == (results["best_epoch"] in flagged)


def test_a_plateau_cut_applies_to_the_next_epochs_steps(tiny_config, tmp_path, monkeypatch):
  config = tiny_config()
  monkeypatch.setattr(train, "reduce_on_plateau",  # a cut after every epoch
                      lambda plateau, value, learning_rate, schedule: (plateau,
                                                                        learning_rate / 10))
  rates, step = [], experiment_lib.Experiment.train_step
  def spy(self, state, batch, key):
    rates.append(float(state.opt_state.hyperparams["learning_rate"]))
    return step(self, state, batch, key)
  monkeypatch.setattr(experiment_lib.Experiment, "train_step", spy)
  train.train_and_evaluate(config, str(tmp_path))
  assert rates == pytest.approx([1e-3] * 15 + [1e-4] * 15)


def test_the_loop_puts_the_next_batch_ahead_and_reads_statistics_every_k_steps(
    tiny_config, tiny_run, tmp_path, monkeypatch):
  """metrics_every_steps=4 (the tiny run reads every 10): the same results, read 4 at a
  time and before the step-10 checkpoint; batch i+1 on the devices before step i runs."""
  events, reads = [], []
  put_batch, train_step = programs.Single.put, programs.Single.step
  def put(self, batches):
    events.append("put")
    return put_batch(self, batches)
  def step(self, batch, number):
    events.append("step")
    return train_step(self, batch, number)
  read = steps.UnreadStatistics.read
  monkeypatch.setattr(programs.Single, "put", put)
  monkeypatch.setattr(programs.Single, "step", step)
  monkeypatch.setattr(steps.UnreadStatistics, "read",
                      lambda self: reads.append(len(self)) or read(self))
  results = train.train_and_evaluate(tiny_config(metrics_every_steps=4), str(tmp_path))
  assert events[:30] == ["put", "put"] + ["step", "put"] * 13 + ["step", "step"]  # epoch 1
  assert reads == [4, 4, 2, 4, 1] * 2  # 15 steps an epoch, the checkpoint at 10
  straight = json.loads((pathlib.Path(tiny_run) / "results.json").read_text())
  straight, results = timeless(straight), timeless(results)
  assert results == straight
  assert ([json.loads(l)["training"] for l in (tmp_path / "metrics.jsonl").open()] ==
          [json.loads(l)["training"] for l in (pathlib.Path(tiny_run) / "metrics.jsonl").open()])


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_config, tmp_path, monkeypatch):
  config = tiny_config()
  interrupt_after(monkeypatch, 12, how="nan")
  # Statistics are read at the checkpoint (step 10) and at the epoch's end (15): the
  # check finds the first bad step among those read together.
  with pytest.raises(FloatingPointError, match=r"gradient norm nan\) at step 13 \(epoch 1; "
                     r"steps 11-15 were checked together\); .*\(step 10\)"):
    train.train_and_evaluate(config, str(tmp_path))
  step, params = params_of(str(tmp_path))
  assert step == 10
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_frozen_word_vectors_stay_fixed(tiny_config, tmp_path):
  vectors = tmp_path / "vectors.txt"
  words = ["a", "the", "of", "engine", "bird", "chirping", "heard", "is"]
  rng = np.random.default_rng(0)
  vectors.write_text(f"{len(words)} 16\n" + "".join(
      w + " " + " ".join(f"{v:.4f}" for v in rng.normal(size=16)) + "\n" for w in words))
  config = tiny_config(word_vectors=str(vectors), num_epochs=1, max_steps_per_epoch=3)
  experiment = experiment_of(config)
  table = np.asarray(experiment.initial_state.params["text"]["embed"]["embedding"])
  article = experiment.corpus.tokenizer.ids["a"]  # the first word of the file
  np.testing.assert_allclose(table[article], [float(f"{v:.4f}") for v in
                             np.random.default_rng(0).normal(size=(8, 16))[0]], rtol=1e-6)
  train.train_and_evaluate(config, str(tmp_path / "run"))
  _, params = params_of(str(tmp_path / "run"))
  np.testing.assert_array_equal(params["text"]["embed"]["embedding"], table)
  initial_conv = np.asarray(experiment.initial_state.params["audio"]["Conv_0"]["kernel"])
  assert np.abs(params["audio"]["Conv_0"]["kernel"] - initial_conv).max() > 0


def test_changed_settings_need_a_new_workdir(tiny_config, tiny_run, tmp_path):
  with pytest.raises(ValueError, match="other settings \\(strategy: 'semihard_cross' there, "
                     "'hard_cross' here\\)"):
    train.train_and_evaluate(tiny_config(strategy="hard_cross"), tiny_run)
  with pytest.raises(ValueError, match="the validation split has 40 caption pairs, fewer "
                     "than one batch of 48: lower --config.batch_size"):
    train.train_and_evaluate(tiny_config(batch_size=48), str(tmp_path / "big_batch"))
  assert not (tmp_path / "big_batch" / "config.json").exists()  # the fixed command may run
  fixed = train.train_and_evaluate(tiny_config(num_epochs=1, max_steps_per_epoch=2),
                                   str(tmp_path / "big_batch"))
  assert (fixed["epochs"], fixed["steps"]) == (1, 2)
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    train.evaluate_only(tiny_config(), str(tmp_path / "empty"))


def test_a_run_from_before_a_config_field_existed_still_resumes(tiny_config, tiny_run, tmp_path):
  workdir = tmp_path / "older"
  shutil.copytree(tiny_run, workdir)
  saved = json.loads((workdir / "config.json").read_text())
  del saved["compute_dtype"]  # as a run written before the field was added
  (workdir / "config.json").write_text(json.dumps(saved))
  results = train.train_and_evaluate(tiny_config(), str(workdir))
  assert results["t2a"] == json.loads((pathlib.Path(tiny_run) / "results.json").read_text())["t2a"]
  assert json.loads((workdir / "config.json").read_text())["compute_dtype"] == "float32"
  with pytest.raises(ValueError, match=r"other settings \(compute_dtype: 'float32' there, "
                     r"'bfloat16' here\)"):
    train.train_and_evaluate(tiny_config(compute_dtype="bfloat16"), str(workdir))


def test_reduce_on_plateau_follows_pytorch_abs_threshold():
  schedule = settings.Settings.of(default.get_config()).optimiser.schedule
  plateau, lr = train.Plateau(), 1e-3
  rates = []
  # 0.996 is not 0.005 below 1.0, so it is a bad epoch; 0.99 improves on 1.0.
  for value in [1.0, 0.996, 0.99, 0.99, 0.99, 0.99, 0.99, 0.99, 0.99]:
    plateau, lr = train.reduce_on_plateau(plateau, value, lr, schedule)
    rates.append(lr)
  assert rates == [1e-3] * 8 + [pytest.approx(1e-4)]  # the 6th bad epoch in a row cuts
  for _ in range(40):
    plateau, lr = train.reduce_on_plateau(plateau, 2.0, lr, schedule)
  assert lr == 1e-6


class RayTrialPlateauStopper:
  """ray.tune.stopper.TrialPlateauStopper as its source writes it (one trial, no
  metric_threshold): a deque of the last results and a count of them."""

  def __init__(self, std, num_results, grace_period):
    self.std, self.num_results, self.grace_period = std, num_results, grace_period
    self.iter, self.results = 0, collections.deque(maxlen=num_results)

  def __call__(self, result):
    self.results.append(result)
    self.iter += 1
    if self.iter < self.grace_period or len(self.results) < self.num_results:
      return False
    return np.std(self.results) < self.std


class PytorchReduceLROnPlateau:
  """torch.optim.lr_scheduler.ReduceLROnPlateau(mode="min", threshold_mode="abs")."""

  def __init__(self, lr, factor, patience, threshold, min_lr):
    self.lr, self.factor, self.patience = lr, factor, patience
    self.threshold, self.min_lr = threshold, min_lr
    self.best, self.num_bad_epochs = float("inf"), 0

  def step(self, metric):
    if metric < self.best - self.threshold:
      self.best, self.num_bad_epochs = metric, 0
    else:
      self.num_bad_epochs += 1
    if self.num_bad_epochs > self.patience:
      self.lr, self.num_bad_epochs = max(self.lr * self.factor, self.min_lr), 0


@pytest.mark.parametrize("seed", range(4))
def test_the_stopper_stops_where_rays_trial_plateau_stopper_does(seed):
  rng = np.random.default_rng(seed)
  options = settings.Stopper(std=float(rng.uniform(0.001, 0.02)),
                             num_results=int(rng.integers(1, 6)),
                             grace_period=int(rng.integers(0, 12)))
  ray = RayTrialPlateauStopper(options.std, options.num_results, options.grace_period)
  values = 1 / np.arange(1, 40) + rng.normal(0, 0.003, 39)
  recent, results = (), 0
  for value in values:
    recent, results, stop = train.plateau_stop(recent, results, value, options)
    assert stop == ray(value), (options, results)


def test_the_authors_loop_steps_the_schedule_from_epoch_zero_and_stops_on_a_plateau(
    tiny_config, tmp_path, monkeypatch):
  """main.py's loop: epoch 0 validates the untrained model; every epoch's validation loss
  steps ReduceLROnPlateau, then Ray's stopper may end the trial. The losses are scripted
  (the real per-epoch validation loss is still computed, on reshuffled batches with
  their last short batch); training is real."""
  scripted = [1.0, 0.8, 0.798, 0.7, 0.69]
  seen = []
  real = experiment_lib.Experiment.validation_loss

  def validation_loss(self, state, epoch):
    seen.append((epoch, np.isfinite(real(self, state, epoch))))
    return scripted[epoch]
  monkeypatch.setattr(experiment_lib.Experiment, "validation_loss", validation_loss)
  config = tiny_config(num_epochs=4, batch_size=16, keep_partial_batch=True,
                       validation_draws="per_epoch", schedule_from_untrained=True,
                       select_by="validation_loss")
  config.plateau.patience = 0
  config.stopper.update(std=0.01, num_results=2, grace_period=3)
  results = train.train_and_evaluate(config, str(tmp_path / "run"))

  scheduler = PytorchReduceLROnPlateau(config.learning_rate, **config.plateau)
  stopper = RayTrialPlateauStopper(**config.stopper)
  rates = []
  for epoch in range(config.num_epochs + 1):  # main.py: range(0, num_epoch + 1)
    scheduler.step(scripted[epoch])
    rates += [scheduler.lr] if epoch else []
    if stopper(scripted[epoch]):
      break
  logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
  assert [m["epoch"] for m in logged] == list(range(1, epoch + 1)) == [1, 2]
  assert [m["learning_rate"] for m in logged] == pytest.approx(rates)
  assert seen == [(e, True) for e in range(epoch + 1)]
  # 120 training pairs in batches of 16: 7 full batches and one of 8, every epoch.
  assert (results["epochs"], results["steps"], results["stopped_early"]) == (2, 16, True)
  assert results["best_epoch"] == 2  # the lowest scripted loss among the trained epochs


@pytest.mark.parametrize("command", ["train", "evaluate_only"])
def test_every_program_a_run_compiles_multiplies_at_its_configured_precision(
    command, tiny_config, tmp_path, monkeypatch):
  """train_and_evaluate and evaluate_only build the experiment, and so trace and compile
  everything, inside jax.default_matmul_precision(config.matmul_precision); under
  "highest" a traced product asks for full float32."""
  seen = []
  class Traced(Exception):
    pass
  class Experiment:  # built on a corpus, or by `of` preparing it first
    def __init__(self, *unused):
      seen.append(jax.config.jax_default_matmul_precision)
      product = jax.jit(lambda a: a @ a).lower(np.ones((2, 2), np.float32)).as_text()
      seen.append("precision = [HIGHEST, HIGHEST]" in product)
      raise Traced

    @classmethod
    def of(cls, *unused):
      return cls()
  monkeypatch.setattr(experiment_lib, "Experiment", Experiment)
  with pytest.raises(Traced):
    getattr(train, "train_and_evaluate" if command == "train" else command)(
        tiny_config(matmul_precision="highest"), str(tmp_path / "run"))
  assert seen == ["highest", True]


def test_per_epoch_validation_reshuffles_and_each_batch_draws_anew_from_the_epochs_seed(
    tiny_config, monkeypatch):
  """--config.validation_draws=per_epoch: each epoch's validation loss reads the split
  reshuffled and draws its random negatives anew, both from the epoch's seed, and each
  batch draws its own, as the authors' loader does. Each is checked where the others
  cannot move the loss: the reshuffle under semihard_cross, which draws nothing, and the
  draws under random over batches held in one order."""
  split = dict(batch_size=16, keep_partial_batch=True)
  fixed = experiment_of(tiny_config(strategy="semihard_cross", **split))
  per_epoch = experiment_of(tiny_config(
      strategy="semihard_cross", validation_draws="per_epoch", **split))
  state = fixed.initial_state
  assert fixed.validation_loss(state, 1) == fixed.validation_loss(state, 2)
  first = per_epoch.validation_loss(state, 1)
  assert per_epoch.validation_loss(state, 1) == first  # seeded: a resumed run is exact
  assert abs(per_epoch.validation_loss(state, 2) - first) > 1e-6
  drawn = experiment_of(tiny_config(
      strategy="random", validation_draws="per_epoch", **split))
  draws, (_, one_order) = drawn.validation_draws, drawn.validation_draws(1)
  monkeypatch.setattr(drawn, "validation_draws", lambda epoch: (draws(epoch)[0], one_order))
  assert abs(drawn.validation_loss(state, 2) - drawn.validation_loss(state, 1)) > 1e-6
  calls, eval_loss = [], drawn._eval_loss  # pylint: disable=protected-access
  monkeypatch.setattr(drawn, "_eval_loss", lambda *args: calls.append(args) or eval_loss(*args))
  drawn.validation_loss(state, 1)
  keys = {np.asarray(jax.random.key_data(key)).tobytes() for _, _, key in calls}
  assert len(keys) == len(calls) == 3  # one key per batch, not the epoch's for all
  (_, batch, key), (_, _, other_key) = calls[:2]
  assert abs(float(eval_loss(state, batch, other_key)) - float(eval_loss(state, batch, key))) > 1e-6
  # The authors' DataLoader(shuffle=True): every pair once, the last batch short.
  batches = list(input_pipeline.as_numpy(per_epoch.train_batches("validation", 7)))
  assert [len(b["audio_id"]) for b in batches] == [16, 16, 8]
  assert sorted(np.concatenate([b["audio_id"] for b in batches])) == sorted(
      list(range(8)) * 5)


def hard_cross_loss(audio, text, audio_mask, text_mask, audio_ids, margin: float) -> float:
  """The triplet loss under hard_cross, one anchor at a time in float64: the alignment
  score as the mean over valid (frame, word) of relu(<frame, word>), each anchor's
  highest-scoring clip and caption of another clip as its negatives, the two hinges
  summed and averaged over the batch (an anchor with no other clip adds 0)."""
  audio, text = np.asarray(audio, np.float64), np.asarray(text, np.float64)
  n = len(audio_ids)
  score = np.array([[np.maximum(audio[a][audio_mask[a]] @ text[t][text_mask[t]].T, 0).mean()
                     for t in range(n)] for a in range(n)])
  total = 0.0
  for i in range(n):
    pool = [j for j in range(n) if audio_ids[j] != audio_ids[i]]
    if pool:
      total += max(max(score[j, i] for j in pool) - score[i, i] + margin, 0)
      total += max(max(score[i, j] for j in pool) - score[i, i] + margin, 0)
  return total / n


def test_the_configs_margin_is_the_margin_of_the_loss_a_run_computes(tiny_config):
  """--config.margin=0.2 reaches the loss through the run's settings and its jitted
  eval_loss: an untrained state's validation loss under hard_cross is that of a loop over
  each batch's embeddings with margin 0.2, and not with the default 0.5."""
  experiment = experiment_of(tiny_config(
      strategy="hard_cross", margin=0.2, batch_size=16, keep_partial_batch=True))
  state = experiment.initial_state
  embed = jax.jit(lambda variables, batch: state.apply_fn(variables, batch, train=False))
  expected = {0.2: [], 0.5: []}
  for batch in experiment.validation_batches(experiment.validation_draws(1)[1]):
    audio, text = embed(state.variables(), {k: batch[k] for k in (
        "audio", "audio_mask", "tokens", "token_mask")})
    for margin, losses in expected.items():
      losses.append(hard_cross_loss(audio, text, batch["audio_mask"], batch["token_mask"],
                                    batch["audio_id"], margin))
  found = experiment.validation_loss(state, 1)
  assert found == pytest.approx(np.mean(expected[0.2]), rel=1e-5)
  assert abs(found - np.mean(expected[0.5])) > 0.1


def test_the_configs_margin_is_the_margin_of_a_training_step(tiny_config):
  """--config.margin=0.2 reaches the train step, not only the validation loss: a jitted
  step on fixed embeddings under hard_cross has the per-anchor loop's loss with margin 0.2,
  and its share of zero-loss triplets counts the gaps (negative - positive) at or below
  -0.2, not -0.5. Catches the step's statistics taking the default margin."""
  loss = settings.Settings.of(tiny_config(strategy="hard_cross", margin=0.2)).loss
  rng = np.random.default_rng(0)
  audio, text = (rng.normal(size=(6, length, 8)).astype(np.float32) for length in (4, 3))
  batch = dict(audio_mask=np.arange(4) < np.array([[4], [2], [3], [4], [1], [4]]),
               token_mask=np.arange(3) < np.array([[3], [1], [2], [3], [3], [2]]),
               audio_id=np.array([0, 0, 1, 2, 3, 4]))
  def encoders(variables, inputs, train, **unused):  # zero where the mask is False
    scale = variables["params"]["scale"]
    return (scale * audio * inputs["audio_mask"][..., None],
            scale * text * inputs["token_mask"][..., None]), {}
  state = steps.TrainState.create(apply_fn=encoders, params={"scale": np.float32(1)},
                                  tx=optax.sgd(0.0), batch_stats={})
  _, statistics = jax.jit(functools.partial(steps.train_step, loss=loss))(
      state, batch, jax.random.key(0))
  masked = (audio * batch["audio_mask"][..., None], text * batch["token_mask"][..., None])
  hand = lambda margin: hard_cross_loss(*masked, batch["audio_mask"], batch["token_mask"],
                                        batch["audio_id"], margin)
  assert float(statistics.loss) == pytest.approx(hand(0.2), rel=1e-5)
  assert abs(float(statistics.loss) - hand(0.5)) > 0.1
  # Each anchor's two gaps: its hardest other clip's and caption's score less its positive's.
  score = np.array([[np.maximum(a[m] @ t[w].T, 0).mean() for t, w in zip(masked[1],
                     batch["token_mask"])] for a, m in zip(masked[0], batch["audio_mask"])])
  gaps = [max(pair[j] for j in range(6) if batch["audio_id"][j] != batch["audio_id"][i])
          - score[i, i] for i in range(6) for pair in (score[:, i], score[i])]
  shares = {m: np.mean([gap + m <= 0 for gap in gaps]) for m in (0.2, 0.5)}
  assert shares[0.2] != shares[0.5]
  assert float(statistics.share_zero_loss) == pytest.approx(shares[0.2], abs=1e-7)


def test_the_reported_checkpoint_is_the_best_epochs_not_the_last(tiny_config, tmp_path,
                                                                 monkeypatch):
  """Selected by the validation loss, scripted lowest after the first of two epochs
  (training and checkpoints real): results.json reports epoch 1 and step 15, and its
  metrics are the test split's under the best checkpoint, not under the latest."""
  scripted = {1: 0.5, 2: 0.9}
  monkeypatch.setattr(experiment_lib.Experiment, "validation_loss",
                      lambda self, state, epoch: scripted[epoch])
  config, workdir = tiny_config(select_by="validation_loss"), tmp_path / "run"
  results = train.train_and_evaluate(config, str(workdir))
  assert (results["best_epoch"], results["best_step"]) == (1, 15)
  assert (results["epochs"], results["steps"]) == (2, 30)
  experiment = experiment_of(config)
  with checkpoints_lib.Checkpoints(str(workdir)) as checkpoints:
    best, _ = checkpoints.restore("best", experiment.initial_state)
    latest, _ = checkpoints.restore("latest", experiment.initial_state)
  assert (int(best.step), int(latest.step)) == (15, 30)
  (from_best, _, _), (from_latest, _, _) = (experiment.evaluation.test(best),
                                           experiment.evaluation.test(latest))
  reported = lambda metrics: {k: metrics[k] for k in ("t2a", "a2t", "t2a_multi")}
  assert reported(results) == reported(from_best)
  assert reported(from_latest) != reported(from_best)


def test_train_step_compiles_once_per_bucket(tiny_config):
  experiment_lib.compiled_steps.cache_clear()  # steps other tests compiled are shared
  # Pairs of 3-6 s clips: some batches fit 224 frames (4.48 s), the rest need 320.
  experiment = experiment_of(tiny_config(frame_buckets=(224, 320), batch_size=2))
  batches = list(input_pipeline.as_numpy(experiment.train_batches("development", 0)))
  state = experiment.initial_state
  for batch in batches:
    state, _ = experiment.train_step(state, experiment.device_batch(batch, "development"),
                                     jax.random.key(0))
  shapes = {b["audio"].shape for b in batches}
  assert len(shapes) == 2 and experiment._train_step._cache_size() == 2


@pytest.mark.parametrize("strategy", ["full_batch", "semihard_cross", "hard_cross", "hard_text",
                                      "hard_audio"])
def test_batch_padding_reproduces_the_authors_training_score(strategy):
  rng = np.random.default_rng(0)
  unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)
  # What the encoders give at every position of a 24-frame / 8-word bucket, padding included.
  audio, text = unit(rng.normal(size=(6, 24, 5))), unit(rng.normal(size=(6, 8, 5)))
  audio_lengths, word_lengths = np.array([9, 17, 4, 12, 17, 6]), np.array([3, 5, 2, 5, 4, 1])
  batch = dict(audio_mask=np.arange(24) < audio_lengths[:, None],
               token_mask=np.arange(8) < word_lengths[:, None],
               audio_id=np.array([0, 0, 1, 2, 2, 3]))
  def encoders(variables, inputs, train):  # zero where the encoder's mask is False
    return (audio * inputs["audio_mask"][..., None], text * inputs["token_mask"][..., None])
  loss = lambda padding: float(steps._loss_and_terms(
      {}, None, encoders, batch, jax.random.key(0), train=False,
      loss=settings.Loss(strategy=strategy, margin=0.5, padding=padding))[0])
  # Their batch is padded to its longest clip (17 frames) and caption (5 words), padded
  # words are zero vectors, and their criterion averages each score over all T x W.
  theirs, *_ = reference.per_anchor_loss(
      reference.NUMPY_OPS, audio[:, :17], (text * batch["token_mask"][..., None])[:, :5],
      batch["audio_id"], strategy, 0.5, None)
  np.testing.assert_allclose(loss("batch"), theirs, rtol=1e-5)
  assert abs(loss("masked") - theirs) > 1e-3  # the default differs: it masks padding


@pytest.mark.parametrize("field", ["select_by", "train_padding", "compute_dtype",
                                   "validation_split", "test_split"])
def test_an_unknown_choice_is_refused_before_anything_is_written(field, tmp_path):
  config = default.get_config()
  config[field] = "sideways"
  with pytest.raises(ValueError, match=rf"--config\.{field} must be one of .*'sideways'"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_the_split_names_are_the_data_sets_own_unless_chosen_from_them():
  config = default.get_config()
  assert settings.Settings.of(config).data.splits == ("development", "validation", "evaluation")
  config.test_split = "validation"
  assert settings.Settings.of(config).data.splits == ("development", "validation", "validation")
  config.test_split = "test"  # AudioCaps' name, not Clotho's
  with pytest.raises(ValueError, match=r"--config\.test_split must be one of \['development', "
                                       r"'validation', 'evaluation'\], not 'test'"):
    settings.Settings.of(config)


@pytest.mark.parametrize("field", ["checkpoint_every_steps", "metrics_every_steps"])
def test_a_cadence_below_one_step_is_refused_before_anything_is_written(field, tmp_path):
  config = default.get_config()
  config[field] = 0
  with pytest.raises(ValueError, match=rf"--config\.{field} must be at least 1, not 0"):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_an_objective_run_learns_siglip_scalars_and_logs_false_negatives(tiny_config, tmp_path):
  config = tiny_config(objective="siglip", similarity="events", filter_similarity=0.99,
                       num_epochs=1, max_steps_per_epoch=4)
  results = train.train_and_evaluate(config, str(tmp_path))
  assert (results["run"], results["objective"]) == ("siglip", "siglip")
  assert set(results["false_negatives"]) == {"false_negative_share", "filtered_share",
                                             "filtered_false_share"}
  assert results["false_negatives"]["false_negative_share"] == 0  # the filter took them all
  line = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
  assert line["training"]["filtered_share"] == results["false_negatives"]["filtered_share"]
  _, params = params_of(str(tmp_path))
  learnt = params["objective"]
  assert float(learnt["bias"]) != -10.0
  assert float(learnt["log_inverse_temperature"]) != pytest.approx(np.log(10.0), abs=1e-7)


@pytest.mark.parametrize("overrides,message", [
    (dict(objective="soft"), r"--config\.objective=soft compares captions: set "
                             r"--config\.similarity"),
    (dict(filter_similarity=0.9), r"--config\.filter_similarity compares captions"),
    (dict(similarity="word_vectors"), r"needs --config\.word_vectors"),
    (dict(objective="clip"), r"--config\.objective must be one of")])
def test_false_negative_settings_that_cannot_run_are_refused(overrides, message, tmp_path):
  config = default.get_config()
  config.update(overrides)
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(config, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def naive_t2a(s: np.ndarray, relevant: list) -> dict:
  """R@1, R@5, R@10 and mAP@10 of caption rows s [Q, C] whose relevant clip is relevant[q],
  one caption at a time (ties: the lower index first)."""
  ranks = []
  for row, clip in zip(s, relevant):
    ranks.append(1 + sum(1 for j, value in enumerate(row)
                         if value > row[clip] or (value == row[clip] and j < clip)))
  ranks = np.array(ranks)
  return {"R@1": np.mean(ranks <= 1), "R@5": np.mean(ranks <= 5), "R@10": np.mean(ranks <= 10),
          "mAP@10": np.mean(np.where(ranks <= 10, 1 / ranks, 0))}


def test_training_beats_the_initial_state_and_the_dcase_file_scores_as_results_json(
    tiny_config, tmp_path):
  """Three epochs of infonce at a higher rate, tested on the 24-clip development split
  (the tiny test split has fewer clips than a submission ranks): mAP@10 well above the
  untrained state's on the same split in both directions. The run's t2a metrics are those
  of a caption-by-caption loop over the best checkpoint's scores; its DCASE file, scored by
  ntxr.dcase against the split's captions file, gives that loop over the distinct caption
  texts (the relevant clip the last row naming a text, as the challenge's script keeps)."""
  config = tiny_config(objective="infonce", learning_rate=3e-3, num_epochs=3,
                       test_split="development")
  workdir = tmp_path / "run"
  results = train.train_and_evaluate(config, str(workdir))
  experiment = experiment_of(config)
  initial, _, _ = experiment.evaluation.test(experiment.initial_state)
  assert results["t2a"]["mAP@10"] > initial["t2a"]["mAP@10"] + 0.05
  assert results["a2t"]["mAP@10"] > 2 * initial["a2t"]["mAP@10"]
  with checkpoints_lib.Checkpoints(str(workdir)) as checkpoints:
    best, _ = checkpoints.restore("best", experiment.initial_state)
  _, submission, _ = experiment.evaluation.test(best)
  clips = [name for name, captions in experiment.corpus.captions("development") for _ in captions]
  relevant = [submission.file_names.index(name) for name in clips]
  expected = naive_t2a(submission.scores, relevant)
  assert {k: results["t2a"][k] for k in expected} == pytest.approx(expected, abs=1e-9)
  last = {caption: row for row, caption in enumerate(submission.captions)}
  assert len(last) < len(clips)  # the tiny corpus repeats some captions
  distinct = naive_t2a(submission.scores[list(last.values())],
                       [relevant[row] for row in last.values()])
  source = os.path.join(config.cache_dir, "synthetic_tiny", "clotho_captions_development.csv")
  scored = dcase.score_files(source, str(workdir / "dcase_development.csv"))
  assert {k: scored[k] for k in distinct} == pytest.approx(distinct, abs=1e-9)


def test_a_nan_gradient_with_a_finite_loss_stops_at_its_step():
  """The statistics read every k steps: a finite loss with a NaN gradient norm (a step that
  would write NaN parameters) stops training, naming that step and the checkpoint kept."""
  unread = steps.UnreadStatistics()
  good = lambda **fields: steps.TrainingStatistics(**{**dict(
      loss=0.5, grad_norm=1.0, share_zero_loss=0.0, share_at_margin=0.0, positive_mean=0.5,
      positive_std=0.1, negative_mean=0.4, negative_std=0.1), **fields})
  for step, statistics in ((6, good()), (7, good(grad_norm=float("nan"))), (8, good())):
    unread.add(step, statistics)
  class Kept:  # what the check reads of the run's checkpoints
    root = "/runs/x/checkpoints"
    step = staticmethod(lambda which: 5)
  with pytest.raises(FloatingPointError, match=re.escape(
      "training loss became 0.5 (gradient norm nan) at step 7 (epoch 2; steps "
      "6-8 were checked together); stopped. The last good checkpoint (step 5) is kept in "
      "/runs/x/checkpoints")):
    train.check_statistics(train.Progress(learning_rate=1e-3), unread.read(), 2, Kept())
