"""Training and evaluation: train state, jitted steps, the epoch loop, checkpoints.

`train_and_evaluate(config, workdir)` trains (resuming from `workdir` if a run is
there), keeps the latest and the best (by `config.select_by`: validation text-to-audio
mAP@10, or the authors' lowest validation loss) checkpoints, evaluates the best on the
test split and writes, in workdir:
  metrics.jsonl            one line per epoch (training, validation, collapse signs)
  tensorboard/             the same as TensorBoard scalars
  results.json             test metrics both directions, strategy, whether the reported
                           checkpoint's epoch was flagged as collapsed and which epochs
                           were, clips skipped when preparing, epochs, seconds
  dcase_{split}.csv        the DCASE submission (each caption's top 10 files)
"""

import dataclasses
import functools
import json
import os
import time
from typing import Any, Optional

from absl import logging
from flax import traverse_util
from flax.training import train_state
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp
import tensorflow_datasets as tfds
import tqdm

from ntxr import dcase, evaluate, files, models, parallel, sampling
from ntxr.data import corpus as corpus_lib, features, input_pipeline, tokenizer as tokenizer_lib

# Config fields a resumed run may change (they leave training as it was); any other
# change needs a new workdir.
RESUMABLE_CHANGES = ("num_epochs", "checkpoint_every_steps", "cache_dir", "eval_batch_size",
                     "collapse")


class TrainState(train_state.TrainState):
  batch_stats: Any

  def variables(self, params=None) -> dict:
    """The model's variables, with `params` in place of the state's if given."""
    return {"params": self.params if params is None else params,
            "batch_stats": self.batch_stats}


def make_optimizer(learning_rate, frozen_text: bool) -> optax.GradientTransformation:
  """Adam; with frozen_text the word table (params/text/embed) is never updated."""
  adam = optax.adam(learning_rate)
  if not frozen_text:
    return adam
  labels = lambda params: traverse_util.path_aware_map(
      lambda path, _: "frozen" if path[:2] == ("text", "embed") else "train", params)
  return optax.multi_transform({"train": adam, "frozen": optax.set_to_zero()}, labels)


def create_train_state(config: ml_collections.ConfigDict, model: models.DualEncoder,
                       key: jax.Array, word_table: Optional[np.ndarray] = None, *,
                       mel_bands: int = features.LogMelConfig.mel_bands) -> TrainState:
  """Initialised parameters and optimizer; word_table [V, E] replaces (and freezes) the
  text encoder's table."""
  frames, words = config.frame_buckets[0], config.max_tokens
  example = dict(audio=jnp.zeros((2, frames, mel_bands)), audio_mask=jnp.ones((2, frames), bool),
                 tokens=jnp.ones((2, words), jnp.int32), token_mask=jnp.ones((2, words), bool))
  variables = jax.jit(functools.partial(model.init, train=False))(key, example)
  params = variables["params"]
  if word_table is not None:
    expected = params["text"]["embed"]["embedding"].shape
    if word_table.shape != expected:
      raise ValueError(f"word vectors are {word_table.shape}, the text encoder needs "
                       f"{expected}: set --config.embed_dim={word_table.shape[1]}")
    params = {**params, "text": {"embed": {"embedding": jnp.asarray(word_table)}}}
  tx = optax.inject_hyperparams(make_optimizer, static_args="frozen_text")(
      learning_rate=config.learning_rate, frozen_text=word_table is not None)
  state = TrainState.create(apply_fn=model.apply, params=params, tx=tx,
                            batch_stats=variables["batch_stats"])
  # Strongly typed leaves, as train_step returns them: the step compiles once, not twice.
  return jax.tree.map(lambda x: jnp.asarray(x, dtype=jnp.asarray(x).dtype), state)


def triplet_statistics(terms: sampling.TripletTerms, margin: float) -> dict:
  """Batch means over valid anchors and both directions: the share of triplets at zero
  loss and at exactly the margin (negative scored as the positive), and the positive
  and negative scores' mean and spread."""
  valid = terms.valid[:, None] & jnp.ones_like(terms.negative, bool)
  gap = terms.negative - terms.positive[:, None]
  mean = lambda x: jnp.sum(jnp.where(valid, x, 0)) / jnp.maximum(valid.sum(), 1)
  negative_mean = mean(terms.negative)
  return dict(
      share_zero_loss=mean(gap + margin <= 0),
      share_at_margin=mean(jnp.abs(gap) <= 1e-6),
      positive_mean=jnp.mean(terms.positive),
      positive_std=jnp.std(terms.positive),
      negative_mean=negative_mean,
      negative_std=jnp.sqrt(mean(jnp.square(terms.negative - negative_mean))))


PADDINGS = ("masked", "batch")


def _to_longest(mask: jax.Array) -> jax.Array:
  """[B, L] -> [B, L]: every row valid up to the batch's longest row."""
  longest = mask.sum(axis=1).max()
  return jnp.broadcast_to(jnp.arange(mask.shape[1]) < longest, mask.shape)


def training_masks(batch: dict, padding: str) -> tuple:
  """(the audio encoder's mask [B, T], the score's audio [B, T] and word [B, W] masks).

  "masked": each clip's and caption's own length everywhere. "batch": the authors'
  training semantics, where a batch is zero-padded to its longest clip and caption and
  the score's mean runs over all those T x W pairs: padded frames are encoded like
  audio, and padded words (a zero vector) count in the mean with a zero product.
  """
  if padding == "masked":
    return batch["audio_mask"], batch["audio_mask"], batch["token_mask"]
  if padding != "batch":
    raise ValueError(f"padding must be one of {PADDINGS}, not {padding!r}")
  audio_mask = _to_longest(batch["audio_mask"])
  return audio_mask, audio_mask, _to_longest(batch["token_mask"])


def _loss_and_terms(variables: dict, apply_fn, batch: dict, key: jax.Array, *, train: bool,
                    strategy: str, margin: float, score: str, padding: str = "masked"):
  """(loss, (new batch_stats or None, TripletTerms)) of one batch."""
  dropout_key, sample_key = jax.random.split(key)
  encoder_mask, audio_mask, text_mask = training_masks(batch, padding)
  inputs = dict(batch, audio_mask=encoder_mask)
  if train:
    (audio, text), updates = apply_fn(variables, inputs, train=True, mutable=["batch_stats"],
                                      rngs={"dropout": dropout_key})
  else:
    (audio, text), updates = apply_fn(variables, inputs, train=False), {}
  loss, terms = sampling.triplet_loss_and_terms(
      audio, text, batch["audio_id"], strategy=strategy, margin=margin, key=sample_key,
      audio_mask=audio_mask, text_mask=text_mask, score=score)
  return loss, (updates.get("batch_stats"), terms)


def train_step(state: TrainState, batch: dict, key: jax.Array, *, strategy: str,
               margin: float, score: str, padding: str = "masked"):
  """One optimizer step: (state, batch, key) -> (state, metrics). Jit it with
  donate_argnums=0.

  batch: {audio [B,T,F], audio_mask [B,T], tokens [B,W], token_mask [B,W], audio_id [B]}.
  """
  def loss_fn(params):
    return _loss_and_terms(state.variables(params), state.apply_fn, batch, key, train=True,
                           strategy=strategy, margin=margin, score=score, padding=padding)
  (loss, (batch_stats, terms)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  return state, dict(loss=loss, grad_norm=optax.tree.norm(grads),
                     **triplet_statistics(terms, margin))


def eval_loss(state: TrainState, batch: dict, key: jax.Array, *, strategy: str,
              margin: float, score: str, padding: str = "masked") -> jax.Array:
  """The loss of one batch in inference mode (no dropout, running BatchNorm)."""
  return _loss_and_terms(state.variables(), state.apply_fn, batch, key, train=False,
                         strategy=strategy, margin=margin, score=score, padding=padding)[0]


@functools.partial(jax.jit, static_argnames="method")
def _embed(state: TrainState, arrays: tuple, method: str) -> jax.Array:
  return state.apply_fn(state.variables(), *arrays, method=method)


def reduce_on_plateau(plateau: dict, value: float, learning_rate: float,
                      config: ml_collections.ConfigDict) -> tuple:
  """PyTorch's ReduceLROnPlateau(mode="min", threshold_mode="abs") for one epoch.

  plateau: {"best": lowest value so far, "bad_epochs": epochs since it improved}.
  Returns (plateau, learning_rate): the rate is multiplied by factor (not below
  min_lr) once more than `patience` epochs in a row fail to improve on the best by
  `threshold`.

  Example:
    >>> from ntxr.configs import default
    >>> c, state, lr = default.get_config(), {"best": float("inf"), "bad_epochs": 0}, 1e-3
    >>> for loss in [1.0, 0.999, 0.998, 0.997, 0.996, 0.996, 0.996]:
    ...   state, lr = reduce_on_plateau(state, loss, lr, c)
    >>> state, round(lr, 6)
    ({'best': 1.0, 'bad_epochs': 0}, 0.0001)
  """
  options = config.plateau
  if value < plateau["best"] - options.threshold:
    plateau = dict(best=float(value), bad_epochs=0)
  else:
    plateau = dict(plateau, bad_epochs=plateau["bad_epochs"] + 1)
  if plateau["bad_epochs"] > options.patience:
    learning_rate = max(learning_rate * options.factor, options.min_lr)
    plateau = dict(plateau, bad_epochs=0)
  return plateau, learning_rate


def set_learning_rate(state: TrainState, learning_rate: float) -> TrainState:
  hyperparams = dict(state.opt_state.hyperparams,
                     learning_rate=jnp.asarray(learning_rate, jnp.float32))
  return state.replace(opt_state=state.opt_state._replace(hyperparams=hyperparams))


class Checkpoints:
  """Orbax checkpoints in workdir/checkpoints/{latest,best}: train state + progress.

  Orbax writes to a temporary folder and renames it when complete, so a run killed
  mid-save leaves the previous checkpoint as the one a rerun restores.
  """

  def __init__(self, workdir: str):
    root = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(max_to_keep=1, create=True)
    self.latest = ocp.CheckpointManager(os.path.join(root, "latest"), options=options)
    self.best = ocp.CheckpointManager(os.path.join(root, "best"), options=options)

  @staticmethod
  def save(manager: ocp.CheckpointManager, state: TrainState, progress: dict) -> None:
    step = int(state.step)
    if manager.latest_step() != step:
      manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                 progress=ocp.args.JsonSave(progress)))

  @staticmethod
  def progress(manager: ocp.CheckpointManager):
    """(step, progress) of the manager's checkpoint without reading its arrays, or None."""
    step = manager.latest_step()
    if step is None:
      return None
    return step, manager.restore(step, args=ocp.args.Composite(
        progress=ocp.args.JsonRestore())).progress

  @staticmethod
  def restore(manager: ocp.CheckpointManager, state: TrainState):
    """(state, progress) of the manager's checkpoint, or None if it has none."""
    step = manager.latest_step()
    if step is None:
      return None
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state), progress=ocp.args.JsonRestore()))
    return restored.state, restored.progress

  def close(self) -> None:
    for manager in (self.latest, self.best):
      manager.wait_until_finished()
      manager.close()


class Log:
  """metrics.jsonl (one line per epoch) and TensorBoard scalars in workdir, written by
  the first process only."""

  def __init__(self, workdir: str, completed_epochs: int):
    from flax.metrics import tensorboard  # pylint: disable=g-import-not-at-top
    self.chief = jax.process_index() == 0
    if not self.chief:
      return
    self.path = os.path.join(workdir, "metrics.jsonl")
    if os.path.exists(self.path):  # drop epochs a resumed run will redo
      with open(self.path) as f:
        kept = [line for line in f if line.strip() and
                json.loads(line)["epoch"] <= completed_epochs]
      files.write_text(self.path, "".join(kept))
    self.tensorboard = tensorboard.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, record: dict) -> None:
    if not self.chief:
      return
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for name, value in traverse_util.flatten_dict(record, sep="/").items():
      if isinstance(value, (int, float)) and not isinstance(value, bool):
        self.tensorboard.scalar(name, value, step)
    self.tensorboard.flush()


@dataclasses.dataclass
class Split:
  """A split's embeddings: clips [C, T, E] + mask, captions [Q, W, E] + mask, ids."""
  audio: np.ndarray
  audio_mask: np.ndarray
  clip_ids: np.ndarray
  text: np.ndarray
  text_mask: np.ndarray
  caption_ids: np.ndarray


def _embed_all(state: TrainState, batches, inputs: tuple, method: str, size: int,
               devices: parallel.Devices) -> tuple:
  """(embeddings [N, L, E], mask [N, L], audio_id [N]) of every row of `batches`.

  Each batch is padded to `size` rows so one shape compiles once, and split over the
  devices; steps are padded to the longest batch's.
  """
  embedded, masks, ids = [], [], []
  for batch in input_pipeline.as_numpy(batches):
    rows = len(batch["audio_id"])
    padded = [np.pad(batch[k], [(0, size - rows)] + [(0, 0)] * (batch[k].ndim - 1))
              for k in inputs]
    out = _embed(state, devices.shard(tuple(padded)), method)
    embedded.append(np.asarray(multihost_utils.process_allgather(out, tiled=True))[:rows])
    masks.append(batch[inputs[1]])
    ids.append(batch["audio_id"])
  steps = max(m.shape[1] for m in masks)
  pad = lambda x: np.pad(x, [(0, 0), (0, steps - x.shape[1])] + [(0, 0)] * (x.ndim - 2))
  return (np.concatenate([pad(e) for e in embedded]), np.concatenate([pad(m) for m in masks]),
          np.concatenate(ids))


def embed_split(state: TrainState, clips, tokenizer, config, devices: parallel.Devices) -> Split:
  """Embeds every clip and caption of a split (builder.as_dataset(split=...)), in order."""
  size = config.eval_batch_size
  audio = _embed_all(state, input_pipeline.clip_batches(
      clips, batch_size=size, frame_buckets=config.frame_buckets),
      ("audio", "audio_mask"), "embed_audio", size, devices)
  text = _embed_all(state, input_pipeline.caption_batches(
      clips, tokenizer, batch_size=size, max_tokens=config.max_tokens),
      ("tokens", "token_mask"), "embed_text", size, devices)
  return Split(*audio, *text)


def _scores(split: Split, config) -> np.ndarray:
  s = evaluate.score_matrix(split.audio, split.audio_mask, split.text, split.text_mask,
                            score=config.score)
  if not np.isfinite(s).all():
    raise FloatingPointError("retrieval scores became NaN or infinite")
  return s


def _checked_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes config.json, or checks that a resumed run has the same one; raises
  ValueError first, writing nothing, for a config that cannot run."""
  if config.require_word_vectors and not config.word_vectors:
    raise ValueError(
        "this config trains on frozen word2vec vectors, as the paper: pass "
        "--config.word_vectors=/path/to/GoogleNews-vectors-negative300.bin (or any "
        "word2vec-format file), or --config.require_word_vectors=false to learn a "
        "random word table instead")
  for field, choices in [("select_by", SELECTIONS), ("train_padding", PADDINGS)]:
    if config[field] not in choices:
      raise ValueError(f"--config.{field} must be one of {sorted(choices)}, not "
                       f"{config[field]!r}")
  path = os.path.join(workdir, "config.json")
  current = json.loads(config.to_json())
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
    changed = sorted(k for k in set(current) | set(previous)
                     if k not in RESUMABLE_CHANGES and current.get(k) != previous.get(k))
    if changed:
      raise ValueError(f"{workdir} holds a run with other settings ({', '.join(changed)}); "
                       f"use another --workdir")
  os.makedirs(workdir, exist_ok=True)
  files.write_json(path, current)


class Experiment:
  """The data, model and jitted functions of one config, data-parallel over `devices`
  (default: all)."""

  def __init__(self, config: ml_collections.ConfigDict, devices=None):
    self.config = config
    self.devices = parallel.Devices(devices)
    self.devices.check_divides("--config.batch_size", config.batch_size)
    self.devices.check_divides("--config.eval_batch_size", config.eval_batch_size)
    self.corpus = corpus_lib.from_config(config)
    self.builder, self.tokenizer = self.corpus.builder, self.corpus.tokenizer
    self.training_split = self.corpus.splits[0]
    self.validation_split = config.validation_split or self.corpus.splits[1]
    self.test_split = config.test_split or self.corpus.splits[2]
    word_table = None
    if config.word_vectors:
      word_table, missing = tokenizer_lib.read_word2vec(
          config.word_vectors, self.tokenizer.words, missing=config.missing_word_vectors)
      logging.info("word vectors: %d of %d words missing from %s (%s, frozen)", len(missing),
                   len(self.tokenizer.words), config.word_vectors, config.missing_word_vectors)
    model = models.DualEncoder(vocab_size=self.tokenizer.vocab_size,
                               embed_dim=config.embed_dim, channels=tuple(config.channels),
                               dropout=config.dropout, initializer=config.initializer)
    self.initial_state = self.devices.replicate(create_train_state(
        config, model, jax.random.key(config.seed), word_table,
        mel_bands=self.builder.builder_config.logmel.mel_bands))
    loss_args = dict(strategy=config.strategy, margin=config.margin, score=config.score,
                     padding=config.train_padding)
    self._train_step = self.devices.jit(functools.partial(train_step, **loss_args),
                                        donate_argnums=0)
    self._eval_loss = self.devices.jit(functools.partial(eval_loss, **loss_args))

  def train_step(self, state: TrainState, batch: dict, key: jax.Array):
    """(state, metrics) after one step on a global batch of numpy arrays."""
    return self._train_step(state, self.devices.shard(batch), key)

  def eval_loss(self, state: TrainState, batch: dict, key: jax.Array) -> jax.Array:
    return self._eval_loss(state, self.devices.shard(batch), key)

  def embed_split(self, state: TrainState, split: str) -> Split:
    return embed_split(state, self.clips(split), self.tokenizer, self.config, self.devices)

  def clips(self, split: str):
    return self.builder.as_dataset(split=split)

  def train_batches(self, split: str, seed: int):
    return input_pipeline.train_batches(
        self.clips(split), self.tokenizer, batch_size=self.config.batch_size, seed=seed,
        frame_buckets=self.config.frame_buckets, max_tokens=self.config.max_tokens)

  def captions(self, split: str) -> list:
    """[(file_name, [captions])] of a split's clips in order, without decoding audio."""
    clips = self.builder.as_dataset(split=split,
                                    decoders={"logmel": tfds.decode.SkipDecoding()})
    return [(c["file_name"].decode(), [x.decode() for x in c["captions"]])
            for c in tfds.as_numpy(clips)]

  def batches_per_epoch(self, split: str) -> int:
    """Full batches of caption pairs in a split; raises ValueError if it has none."""
    pairs = sum(len(captions) for _, captions in self.captions(split))
    if pairs < self.config.batch_size:
      raise ValueError(f"the {split} split has {pairs} caption pairs, fewer than one batch "
                       f"of {self.config.batch_size}: lower --config.batch_size")
    return pairs // self.config.batch_size

  def validate(self, state: TrainState, triplets: dict) -> dict:
    """Validation loss (fixed seed), retrieval metrics and collapse diagnostics."""
    key = jax.random.key(self.config.seed)
    losses = [float(self.eval_loss(state, batch, key)) for batch in
              input_pipeline.as_numpy(self.train_batches(self.validation_split, 0))]
    split = self.embed_split(state, self.validation_split)
    metrics = evaluate.both_directions(_scores(split, self.config), split.clip_ids,
                                       split.caption_ids)
    collapse = evaluate.collapse_diagnostics(
        split.audio, split.audio_mask, split.text, split.text_mask,
        {k: v for k, v in triplets.items() if k != "loss"}, self.config.collapse.to_dict())
    loss = float(np.mean(losses))
    if not np.isfinite(loss):
      raise FloatingPointError(f"validation loss is {loss}")
    return dict(loss=loss, **metrics, collapse=collapse)

  def test(self, state: TrainState, workdir: str) -> dict:
    """Test-split metrics and score histogram; its DCASE submission written to workdir."""
    split_name = self.test_split
    split = self.embed_split(state, split_name)
    s = _scores(split, self.config)
    names = self.captions(split_name)
    if len(names) >= dcase.TOP:
      dcase.write_submission(os.path.join(workdir, f"dcase_{split_name}.csv"),
                             [c for _, captions in names for c in captions],
                             [f for f, _ in names], s.T)
    else:
      logging.warning("%s has %d clips, fewer than a DCASE submission's %d: none written",
                      split_name, len(names), dcase.TOP)
    return dict(evaluate.both_directions(s, split.clip_ids, split.caption_ids),
                score_histogram=evaluate.score_histogram(s, split.clip_ids, split.caption_ids))


# How the reported ("best") checkpoint is chosen from each epoch's validation: the
# higher the better.
SELECTIONS = {
    "t2a_mAP@10": lambda validation: validation["t2a"]["mAP@10"],
    "validation_loss": lambda validation: -validation["loss"],  # the authors' choice
}


def _fresh_progress(config) -> dict:
  return dict(epoch=0, step_in_epoch=0, learning_rate=config.learning_rate,
              plateau=dict(best=float("inf"), bad_epochs=0), best_selection=-float("inf"),
              best_epoch=0, seconds=0.0, collapse_epochs=[])


def _epoch_seed(seed: int, epoch: int) -> int:
  return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming if workdir holds a run), then tests the best checkpoint.

  Returns the dict written to workdir/results.json. Raises FloatingPointError if the
  loss or a score becomes NaN; the last good checkpoints stay in workdir.
  """
  _checked_config(workdir, config)
  experiment = Experiment(config)
  checkpoints = Checkpoints(workdir)
  try:
    state, progress = Checkpoints.restore(checkpoints.latest, experiment.initial_state) or (
        experiment.initial_state, _fresh_progress(config))
    if progress["epoch"] or progress["step_in_epoch"]:
      logging.info("resuming at epoch %d, step %d", progress["epoch"] + 1, int(state.step))
    log = Log(workdir, progress["epoch"])
    _train(experiment, state, progress, checkpoints, log, workdir)
    return _test_best(experiment, checkpoints, workdir)
  finally:
    checkpoints.close()


def _train(experiment: Experiment, state: TrainState, progress: dict,
           checkpoints: Checkpoints, log: Log, workdir: str) -> None:
  config = experiment.config
  select = SELECTIONS[config.select_by]
  steps_per_epoch = experiment.batches_per_epoch(experiment.training_split)
  if config.max_steps_per_epoch:
    steps_per_epoch = min(steps_per_epoch, config.max_steps_per_epoch)
  experiment.batches_per_epoch(experiment.validation_split)  # fails now, not in epoch 1
  base_key = jax.random.key(config.seed + 1)
  while progress["epoch"] < config.num_epochs:
    start = time.perf_counter()
    epoch = progress["epoch"] + 1
    batches = experiment.train_batches(experiment.training_split,
                                       _epoch_seed(config.seed, epoch))
    sums, count = {}, 0
    batches = batches.take(steps_per_epoch).skip(progress["step_in_epoch"])
    bar = tqdm.tqdm(input_pipeline.as_numpy(batches),
                    total=steps_per_epoch, initial=progress["step_in_epoch"],
                    desc=f"epoch {epoch}/{config.num_epochs}", unit="batch")
    for batch in bar:
      step = int(state.step)
      state, metrics = experiment.train_step(state, batch, jax.random.fold_in(base_key, step))
      metrics = jax.device_get(metrics)
      if not (np.isfinite(metrics["loss"]) and np.isfinite(metrics["grad_norm"])):
        raise FloatingPointError(
            f"training loss became {metrics['loss']} (gradient norm "
            f"{metrics['grad_norm']}) at step {step + 1} (epoch {epoch}); "
            f"stopped. The last good checkpoint (step {checkpoints.latest.latest_step()}) "
            f"is kept in {workdir}/checkpoints; try a lower --config.learning_rate")
      for name, value in metrics.items():
        sums[name] = sums.get(name, 0.0) + float(value)
      count += 1
      bar.set_postfix(loss=f"{sums['loss'] / count:.4f}")
      progress["step_in_epoch"] += 1
      if (progress["step_in_epoch"] % config.checkpoint_every_steps == 0
          and progress["step_in_epoch"] < steps_per_epoch):  # the epoch's end saves below
        Checkpoints.save(checkpoints.latest, state, progress)
    training = {name: total / max(count, 1) for name, total in sums.items()}
    validation = experiment.validate(state, training)
    plateau, learning_rate = reduce_on_plateau(progress["plateau"], validation["loss"],
                                               progress["learning_rate"], config)
    state = set_learning_rate(state, learning_rate)
    collapse = validation["collapse"]
    if collapse["collapse"]:
      logging.warning("feature collapse at epoch %d: %s", epoch,
                      "; ".join(collapse["collapse_reasons"]))
      progress["collapse_epochs"] = progress["collapse_epochs"] + [epoch]
    progress.update(epoch=epoch, step_in_epoch=0, learning_rate=learning_rate,
                    plateau=plateau, seconds=progress["seconds"] + time.perf_counter() - start)
    if select(validation) > progress["best_selection"]:
      progress.update(best_selection=select(validation), best_epoch=epoch)
      Checkpoints.save(checkpoints.best, state, progress)
    Checkpoints.save(checkpoints.latest, state, progress)
    checkpoints.latest.wait_until_finished()
    log.write(int(state.step), dict(epoch=epoch, step=int(state.step), training=training,
                                    validation=validation, learning_rate=learning_rate,
                                    seconds=progress["seconds"]))
    tqdm.tqdm.write(
        f"epoch {epoch}: train loss {training.get('loss', float('nan')):.4f}, validation "
        f"loss {validation['loss']:.4f}, t2a R@10 {validation['t2a']['R@10']:.3f} mAP@10 "
        f"{validation['t2a']['mAP@10']:.3f}, a2t R@10 {validation['a2t']['R@10']:.3f}, lr {learning_rate:g}")


def _test_best(experiment: Experiment, checkpoints: Checkpoints, workdir: str) -> dict:
  """Evaluates the best checkpoint on the test split; writes results.json."""
  checkpoints.best.wait_until_finished()
  restored = Checkpoints.restore(checkpoints.best, experiment.initial_state)
  if restored is None:
    raise FileNotFoundError(f"{workdir}/checkpoints/best: no checkpoint; train first")
  state, progress = restored
  steps, trained = Checkpoints.progress(checkpoints.latest) or (int(state.step), progress)
  skipped = [entry for entries in experiment.corpus.skipped.values() for entry in entries]
  results = dict(experiment.test(state, workdir), strategy=experiment.config.strategy,
                 score=experiment.config.score, split=experiment.test_split,
                 collapse=progress["best_epoch"] in trained["collapse_epochs"],
                 collapse_epochs=trained["collapse_epochs"], epochs=trained["epoch"],
                 selected_by=experiment.config.select_by,
                 skipped=dict(count=len(skipped), entries=skipped),
                 steps=steps,
                 best_epoch=progress["best_epoch"], best_step=int(state.step),
                 seconds=trained["seconds"])
  files.write_json(os.path.join(workdir, "results.json"), results)
  return results


def evaluate_only(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Tests the best checkpoint in workdir without training."""
  checkpoints = Checkpoints(workdir)
  try:
    return _test_best(Experiment(config), checkpoints, workdir)
  finally:
    checkpoints.close()
