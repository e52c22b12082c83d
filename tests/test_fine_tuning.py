"""Fine-tuning controls for pretrained encoders: the DCASE 2025 baseline's warm-up and
cosine schedule, separate learning rates for the encoders, frozen encoders, AdamW's
decay, bfloat16 compute and rematerialisation; each against an independent expectation
(the baseline's own formula, Adam's first step, the float32 or unrematerialised run)."""

import functools
import json
import math
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import pretrained_files
import recordings
from runs import assert_same_run, experiment_of
from ntxr import checkpoints as checkpoints_lib, experiment as experiment_lib, models
from ntxr import scores, settings, steps, sweep, train
from ntxr.data import features
from ntxr.encoders import bert, cnn14, passt


def baseline_rate(step: int, min_lr: float, max_lr: float, warmup_epochs: int,
                  rampdown_epochs: int, steps_per_epoch: int) -> float:
  """d25_t6/retrieval_module.py's lr_scheduler_step (CPJKU/dcase2025_task6_baseline)."""
  warmup_steps = warmup_epochs * steps_per_epoch
  total_steps = (warmup_epochs + rampdown_epochs) * steps_per_epoch
  decay_steps = total_steps - warmup_steps
  if step < warmup_steps:
    return min_lr + (max_lr - min_lr) * (step / warmup_steps)
  if step < total_steps:
    progress = (step - warmup_steps) / decay_steps
    return min_lr + (max_lr - min_lr) * 0.5 * (1 + math.cos(math.pi * progress))
  return min_lr


def test_warmup_cosine_is_the_dcase_2025_baselines_schedule():
  for step in range(0, 60):
    expected = baseline_rate(step, 1e-7, 2e-5, 1, 3, steps_per_epoch=10)
    got = float(steps.warmup_cosine(step, peak=2e-5, warmup=10, decay=30, lowest=1e-7))
    assert got == pytest.approx(expected, rel=1e-6), step


def _state(params, updates, learning_rate=1e-2):
  return steps.TrainState.create(apply_fn=None, params=params, batch_stats={},
                                 tx=steps.optimizer(learning_rate, updates))


def _adam_steps(state, count):
  """`count` steps on a gradient of ones; returns the states after each."""
  states = []
  for _ in range(count):
    state = state.apply_gradients(grads=jax.tree.map(jnp.ones_like, state.params))
    states.append(state)
  return states


def test_each_step_moves_the_parameters_by_the_scheduled_rate():
  """Adam on a constant gradient moves every parameter by the step's rate (its moments'
  bias correction makes m / sqrt(v) exactly 1), so the moves are the schedule."""
  updates = steps.Updates(warmup_cosine=(3, 5, 1e-4))
  state = _state({"w": jnp.zeros(3)}, updates)
  assert steps.scheduled(state)
  before = state.params["w"]
  for step, after in enumerate(_adam_steps(state, 10)):
    expected = baseline_rate(step, 1e-4, 1e-2, 3, 5, steps_per_epoch=1)
    # rtol: float32 holds 1 - 0.999^t (Adam's bias correction) to about 1e-5
    np.testing.assert_allclose(before - after.params["w"], expected, rtol=1e-4)
    assert float(after.opt_state.hyperparams["learning_rate"]) == pytest.approx(expected,
                                                                                  rel=1e-6)
    assert steps.set_learning_rate(after, 0.5) is after  # the schedule's, not the loop's
    before = after.params["w"]


def test_frozen_parts_stay_and_encoders_move_at_their_factor():
  params = {name: {"kernel": jnp.ones(2)} for name in ("audio_encoder", "text_encoder", "audio")}
  params["text"] = {"embed": {"embedding": jnp.ones(2)}}
  updates = steps.Updates(frozen=(("text_encoder",), steps.WORD_TABLE), encoder_lr_factor=0.1)
  (after,) = _adam_steps(_state(params, updates, learning_rate=1e-2), 1)
  moved = jax.tree.map(lambda a, b: float(a[0] - b[0]), params, after.params)
  assert moved == {"audio_encoder": {"kernel": pytest.approx(1e-3, rel=1e-4)},  # float32
                   "text_encoder": {"kernel": 0.0},
                   "audio": {"kernel": pytest.approx(1e-2, rel=1e-4)},
                   "text": {"embed": {"embedding": 0.0}}}
  frozen_state = after.opt_state.inner_state.inner_states["frozen"]
  assert not jax.tree.leaves(frozen_state)  # no Adam moments kept for frozen parameters


def test_weight_decay_is_adamws_decoupled_decay():
  (after,) = _adam_steps(_state({"w": jnp.full(2, 2.0)}, steps.Updates(weight_decay=0.5),
                                learning_rate=1e-2), 1)
  np.testing.assert_allclose(after.params["w"], 2.0 - 1e-2 * (1 + 0.5 * 2.0), rtol=1e-6)
  assert after.params["w"][0] != pytest.approx(2.0 - 1e-2, rel=1e-5)  # Adam alone's


def test_the_papers_optimizer_state_keeps_its_layout():
  """Workdirs of earlier versions resume: without pretrained encoders the optimizer's
  state is Adam's, or the word table's two groups, as before."""
  params = {"audio": {"kernel": jnp.ones(2)}, "text": {"embed": {"embedding": jnp.ones(2)}}}
  plain = _state(params, steps.Updates()).opt_state.inner_state
  assert jax.tree.structure(plain) == jax.tree.structure(optax.adam(1e-3).init(params))
  grouped = _state(params, steps.Updates(frozen=(steps.WORD_TABLE,))).opt_state.inner_state
  assert sorted(grouped.inner_states) == ["frozen", "train"]


@pytest.fixture(scope="module")
def bert_folder(tmp_path_factory):
  return pretrained_files.text_folder(str(tmp_path_factory.mktemp("bert") / "bert"), "bert")


def test_a_frozen_text_encoder_runs_as_published_and_passes_no_gradient(bert_folder):
  loaded = bert.load(bert_folder)
  model = models.DualEncoder(vocab_size=2, embed_dim=8, channels=(2, 2, 2, 2, 2),
                             text_encoder=loaded.module, frozen=("text",))
  tokens = jnp.array([[3, 9, 12, 5, 0, 0], [3, 7, 5, 0, 0, 0]])
  mask = tokens > 0
  variables = model.init(jax.random.key(0), tokens, mask, method="embed_text")
  variables["params"]["text_encoder"] = loaded.variables["params"]

  def embedded(params, train):
    return model.apply({**variables, "params": params}, tokens, mask, train=train,
                       method="embed_text", rngs={"dropout": jax.random.key(1)})

  np.testing.assert_array_equal(embedded(variables["params"], True),
                                embedded(variables["params"], False))  # no dropout
  grads = jax.grad(lambda p: embedded(p, True).sum())(variables["params"])
  assert all(not np.any(g) for g in jax.tree.leaves(grads["text_encoder"]))
  assert any(np.any(g) for g in jax.tree.leaves(grads["text"]))  # the projection trains


def test_cosine_fine_tuning_with_a_frozen_text_encoder_end_to_end(tiny_config, bert_folder,
                                                                  tmp_path):
  """The paper's CRNN with a frozen BERT on the real recordings: each epoch's logged rate
  is the schedule's at the next step (as the plateau's is the next epoch's), the frozen
  encoder ends as published, and the projection and the CRNN train."""
  config = tiny_config(data_dir=recordings.pairs_folder(str(tmp_path / "pairs")),
                       text_encoder="bert", text_weights=bert_folder, frozen="text",
                       lr_schedule="warmup_cosine", learning_rate=1e-3, embed_dim=16,
                       batch_size=4, eval_batch_size=4, num_epochs=3, max_steps_per_epoch=2,
                       max_tokens=24)
  config.warmup_cosine.update(warmup_epochs=1.0, decay_epochs=1.0, min_lr=1e-5)
  initial = experiment_of(config).initial_state
  train.train_and_evaluate(config, str(tmp_path / "run"))
  with open(tmp_path / "run" / "metrics.jsonl", encoding="utf-8") as f:
    logged = [json.loads(line) for line in f if '"epoch"' in line]
  assert [line["learning_rate"] for line in logged] == [
      pytest.approx(baseline_rate(step, 1e-5, 1e-3, 1, 1, steps_per_epoch=2), rel=1e-6)
      for step in (2, 4, 6)]
  with checkpoints_lib.Checkpoints(str(tmp_path / "run")) as checkpoints:
    trained, _ = checkpoints.restore("latest", initial)
  same = lambda name: [np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(trained.params[name]), jax.tree.leaves(initial.params[name]))]
  assert all(same("text_encoder"))
  assert not any(same("text")) and not all(same("audio"))


def test_runs_train_their_pretrained_encoders_in_the_compute_dtype(tiny_config, bert_folder,
                                                                   tmp_path):
  cnn14_path = pretrained_files.cnn14_file(str(tmp_path / "Cnn14_mAP=0.431.pth"))
  config = tiny_config(audio_encoder="cnn14", audio_weights=cnn14_path, text_encoder="bert",
                       text_weights=bert_folder, compute_dtype="bfloat16", remat=True)
  run = settings.Settings.of(config)
  loaded = experiment_lib.pretrained_encoders(run.model, run.data.cache_dir)
  audio, text = loaded["audio"].module, loaded["text"].module
  assert (audio.dtype, audio.remat, audio.precision) == (jnp.bfloat16, True, None)
  assert (text.dtype, text.remat) == (jnp.bfloat16, True)


def _relative_error(got, expected) -> float:
  got, expected = np.asarray(got, np.float32), np.asarray(expected, np.float32)
  return float(np.linalg.norm(got - expected) / np.linalg.norm(expected))


def _waveforms() -> np.ndarray:
  """The first second of two real recordings at 32 kHz [2, 32000]."""
  return np.stack([features.decode_audio(os.path.join(recordings.RECORDINGS, name), 32000)[:32000]
                   for name in ("alarm clock.ogg", "xylofón.mp3")])


@pytest.mark.parametrize("build", [lambda **f: cnn14.Cnn14(**f),
                                   lambda **f: passt.Encoder(passt.Size(64, 2, 4), **f)])
def test_bfloat16_is_close_and_remat_is_exact_for_the_audio_encoders(build):
  """bfloat16 outputs within 3% of float32's; remat gives the same outputs and gradients."""
  waves = _waveforms()
  variables = jax.jit(build().init)(jax.random.key(0), waves)

  def frames(module, params):
    return module.apply({**variables, "params": params}, waves)[0]

  full = jax.jit(functools.partial(frames, build()))(variables["params"])
  half = jax.jit(functools.partial(frames, build(dtype=jnp.bfloat16)))(variables["params"])
  assert half.dtype == jnp.bfloat16
  assert _relative_error(half, full) < 0.03
  # Op by op, not compiled: XLA would fuse the two programs differently, and the sum of
  # PaSST's layer-normed frames is at rounding level. Op by op, remat is bit for bit.
  loss = lambda module: jax.value_and_grad(lambda p: frames(module, p).sum())
  (value, grads), (remat_value, remat_grads) = (loss(build())(variables["params"]),
                                                loss(build(remat=True))(variables["params"]))
  np.testing.assert_allclose(remat_value, value, rtol=1e-6)
  for got, expected in zip(jax.tree.leaves(remat_grads), jax.tree.leaves(grads)):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_bfloat16_is_close_and_remat_is_exact_for_the_text_encoder(bert_folder):
  loaded = bert.load(bert_folder)
  tokens = jnp.array([[2, 9, 12, 5, 3, 0], [2, 7, 3, 0, 0, 0]])
  mask = tokens > 0
  words = lambda module, params: module.apply({"params": params}, tokens, mask)[0]
  full = jax.jit(functools.partial(words, loaded.module))(loaded.variables["params"])
  half = jax.jit(functools.partial(words, loaded.module.clone(dtype=jnp.bfloat16)))(
      loaded.variables["params"])
  assert half.dtype == jnp.bfloat16
  assert _relative_error(np.where(mask[..., None], half, 0),
                         np.where(mask[..., None], full, 0)) < 0.03
  grad = lambda module: jax.grad(lambda p: words(module, p).sum())(loaded.variables["params"])
  for got, expected in zip(jax.tree.leaves(grad(loaded.module.clone(remat=True))),
                           jax.tree.leaves(grad(loaded.module))):
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def _kept_for_the_gradient(module, variables, *inputs) -> int:
  """Bytes the gradient of the sum of `module`'s first output keeps from its forward pass
  (the residuals `jax.vjp` closes over), traced from shapes alone."""
  def residuals(variables, *inputs):
    return jax.vjp(lambda params: module.apply({**variables, "params": params}, *inputs)[0]
                   .sum(), variables["params"])[1]
  return sum(leaf.size * leaf.dtype.itemsize
             for leaf in jax.tree.leaves(jax.eval_shape(residuals, variables, *inputs)))


def test_remat_keeps_the_variables_and_a_fraction_of_the_activations(bert_folder):
  """What remat is for: each block's activations are recomputed for the gradient, not kept.
  On two 10 s clips (or two 40-token captions) the gradient keeps less than half the
  bytes (measured: CNN14 0.36 of 845 MiB, its weights most of the rest; PaSST 0.02; BERT
  0.14), and a checkpoint of a run with remat holds the same variables as one without."""
  waves = jax.ShapeDtypeStruct((2, 320000), jnp.float32)
  tokens = (jax.ShapeDtypeStruct((2, 40), jnp.int32), jax.ShapeDtypeStruct((2, 40), bool))
  text = bert.load(bert_folder).module
  for build, inputs in ((lambda **f: cnn14.Cnn14(**f), (waves,)),
                        (lambda **f: passt.Encoder(passt.Size(64, 2, 4), **f), (waves,)),
                        (lambda **f: text.clone(**f), tokens)):
    plain, remat = build(), build(remat=True)
    variables = jax.eval_shape(plain.init, jax.random.key(0), *inputs)
    assert jax.tree.structure(jax.eval_shape(remat.init, jax.random.key(0), *inputs)) == (
        jax.tree.structure(variables))
    kept, kept_with_remat = (_kept_for_the_gradient(module, variables, *inputs)
                             for module in (plain, remat))
    assert kept_with_remat < kept / 2, type(plain).__name__


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_the_pooled_score_reads_the_clip_and_sentence_outputs(bert_folder, pooling):
  """With the pooled score, a pretrained encoder's embedding at every frame (word) is its
  projected clip (first token's) output, so the masked mean the pooled score takes is
  that output: PaSST's tokens' mean and BERT's [CLS] state (or its words' mean), projected
  and normalised."""
  text = bert.load(bert_folder)
  audio = passt.Encoder(passt.Size(64, 2, 1))
  waves = _waveforms()
  model = models.DualEncoder(vocab_size=2, embed_dim=8, audio_encoder=audio,
                             text_encoder=text.module, pooled_outputs=True,
                             sentence_pooling=pooling)
  frames = waves.shape[1] // 320
  batch = dict(audio=waves.reshape(2, frames, 320), audio_mask=np.ones((2, frames), bool),
               tokens=np.array([[3, 9, 12, 5, 0], [3, 7, 5, 0, 0]]))
  batch["token_mask"] = batch["tokens"] > 0
  variables = model.init(jax.random.key(0), batch)
  variables["params"]["text_encoder"] = text.variables["params"]
  audio_embedded, text_embedded = model.apply(variables, batch)
  params = variables["params"]

  def projected(x, side):
    kernel = params[side]["projection"]
    y = x @ kernel["kernel"] + kernel["bias"]
    return y / np.linalg.norm(y, axis=-1, keepdims=True)

  clips = audio.apply({"params": params["audio_encoder"]}, waves).clip
  words = np.asarray(text.module.apply(text.variables, batch["tokens"] - 1,
                                       batch["token_mask"])[0])
  token_mask = batch["token_mask"][..., None]
  sentences = (words[:, 0] if pooling == "cls" else  # Sentence-BERT's masked mean
               (words * token_mask).sum(axis=1) / token_mask.sum(axis=1))
  for embedded, expected, mask in ((audio_embedded, projected(clips, "audio"),
                                    batch["audio_mask"]),
                                   (text_embedded, projected(sentences, "text"),
                                    batch["token_mask"])):
    pooled = scores.pooled_embeddings(embedded, mask)
    np.testing.assert_allclose(pooled, expected, rtol=1e-5, atol=1e-6)


def test_a_pretrained_sweep_trained_together_is_its_runs_trained_apart(tiny_config, bert_folder,
                                                                      tmp_path):
  """Two strategies of a small PaSST with a frozen BERT under the warm-up and cosine
  schedule, swept with --together (`ntxr.sweep`: its check, one program, its table), are
  the runs trained apart (`runs.assert_same_run`), each epoch's scheduled rate included."""
  base = tiny_config(data_dir=recordings.pairs_folder(str(tmp_path / "pairs")),
                     audio_encoder="passt",
                     audio_weights=pretrained_files.passt_file(str(tmp_path / "passt.pt")),
                     text_encoder="bert", text_weights=bert_folder, frozen="text",
                     lr_schedule="warmup_cosine", frame_buckets=(300,), embed_dim=16,
                     batch_size=4, eval_batch_size=4, num_epochs=2, max_steps_per_epoch=2,
                     max_tokens=24)
  base.warmup_cosine.update(warmup_epochs=1.0, decay_epochs=1.0)
  runs = sweep.plan(str(tmp_path / "sweep"), ["semihard_cross", "hard_text"], [0])
  sweep.check(runs, base)
  assert sweep.run_together(runs, base) == []
  rows = sweep.write_report(str(tmp_path / "sweep"), base)
  assert sorted(row["strategy"] for row in rows) == ["hard_text", "semihard_cross"]
  for run in runs:
    alone = str(tmp_path / "apart" / run.name)
    train.train_and_evaluate(run.config(base), alone)
    assert_same_run(run.workdir, alone)


_TRAIN = """
import json, sys
import ml_collections
import jax
from ntxr import train
assert jax.device_count() == 8
train.train_and_evaluate(ml_collections.ConfigDict(json.loads(sys.argv[1])), sys.argv[2])
"""


def test_pretrained_encoders_on_eight_devices_train_as_on_one(tiny_config, bert_folder,
                                                              tmp_path):
  """A small PaSST and BERT on the built-in corpus, the global batch split over 8 CPU
  devices (another process), train to the run one device trains (`runs.assert_same_run`)."""
  config = tiny_config(audio_encoder="passt",
                       audio_weights=pretrained_files.passt_file(str(tmp_path / "passt.pt")),
                       text_encoder="bert", text_weights=bert_folder, frame_buckets=(300,),
                       patchout=(2, 1), num_epochs=1, max_steps_per_epoch=2, max_tokens=24)
  train.train_and_evaluate(config, str(tmp_path / "one"))
  env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS=(
      os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip())
  child = subprocess.run([sys.executable, "-c", _TRAIN, config.to_json(),
                          str(tmp_path / "eight")], env=env, capture_output=True, text=True,
                         check=False)
  assert child.returncode == 0, child.stderr[-3000:]
  assert_same_run(str(tmp_path / "eight"), str(tmp_path / "one"))


def test_a_frozen_audio_encoder_keeps_its_statistics_and_passes_no_gradient():
  """A frozen CNN14 in training: its BatchNorm statistics stay as loaded (inference mode),
  no gradient reaches its parameters, and its projection trains."""
  model = models.DualEncoder(vocab_size=2, embed_dim=8, audio_encoder=cnn14.Cnn14(),
                             frozen=("audio",))
  waves = _waveforms()
  frames = waves.shape[1] // 320
  audio, mask = waves.reshape(2, frames, 320), np.ones((2, frames), bool)
  variables = jax.jit(functools.partial(model.init, method="embed_audio"))(
      jax.random.key(0), audio, mask)

  def embedded(params):
    return model.apply({**variables, "params": params}, audio, mask, train=True,
                       method="embed_audio", mutable=["batch_stats"],
                       rngs={"dropout": jax.random.key(1)})

  _, moved = jax.jit(embedded)(variables["params"])
  for got, loaded in zip(jax.tree.leaves(moved["batch_stats"]),
                         jax.tree.leaves(variables["batch_stats"])):
    np.testing.assert_array_equal(got, loaded)
  grads = jax.jit(jax.grad(lambda p: embedded(p)[0].sum()))(variables["params"])
  assert all(not np.any(g) for g in jax.tree.leaves(grads["audio_encoder"]))
  assert any(np.any(g) for g in jax.tree.leaves(grads["audio"]))
