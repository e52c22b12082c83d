"""One setting's model and jitted functions on its data: what the training loop works with.

`Experiment(settings, corpus)` builds the model on a prepared corpus (its word vectors
frozen in, if it has them) and its first train state, and jits the steps data-parallel
over the devices; its methods feed them batches of a split and validate. Its
`evaluation` embeds, scores and tests (`ntxr.evaluation`).
`Experiment.of(settings)` prepares the corpus first.
"""

import functools
from typing import Optional

import jax
import numpy as np

from ntxr import evaluation as evaluation_lib, memory as memory_lib, models, parallel
from ntxr import relations as relations_lib, settings, steps
from ntxr.data import corpus as corpus_lib, input_pipeline


def epoch_seed(*entropy: int) -> int:
  """A shuffle seed drawn from its entropy: an epoch's training batches from (run seed,
  epoch), its validation batches from (run seed, epoch, 1)."""
  return int(np.random.SeedSequence(list(entropy)).generate_state(1)[0])


@functools.lru_cache(maxsize=None)
def shared_model(**fields) -> models.DualEncoder:
  """One DualEncoder object per setting in the process. The train state carries its
  bound `apply`, which jit's cache compares by the module's identity, so Experiments
  of one setting must share the object to share compiled steps."""
  return models.DualEncoder(**fields)


@functools.lru_cache(maxsize=None)
def pretrained_encoder(name: str, path: str, cache_dir: Optional[str] = None):
  """The encoder `name` loaded from its publisher's file at `path` (`ntxr.encoders.load`,
  its tensors kept in cache_dir), once per process: a sweep's runs share it."""
  from ntxr import encoders  # pylint: disable=import-outside-toplevel
  return encoders.load(name, path, cache_dir)


def pretrained_encoders(model: settings.Model, cache_dir: Optional[str] = None) -> dict:
  """{"audio" and/or "text": Loaded} of the model's pretrained encoders (none for the
  paper's CRNN and word table), their modules as a run trains them: in the compute dtype,
  rematerialised if asked, CNN14's products after its front end at the run's matmul
  precision (its file's module takes the highest), PaSST with the run's patchout, the
  text encoder with the run's dropout if it sets one (else its config.json's)."""
  dtype = models.compute_dtype(model.compute_dtype)
  text = ({} if model.text_dropout < 0 else
          dict(hidden_dropout=model.text_dropout, attention_dropout=model.text_dropout))
  fields = {"cnn14": dict(precision=None),
            "passt": dict(s_patchout_t=model.patchout[0], s_patchout_f=model.patchout[1]),
            "bert": text, "roberta": text}
  loaded = {}
  for side, name, path in (("audio", model.audio_encoder, model.audio_weights),
                           ("text", model.text_encoder, model.text_weights)):
    if name not in ("crnn", "word_vectors"):
      encoder = pretrained_encoder(name, path, cache_dir)
      loaded[side] = encoder._replace(module=encoder.module.clone(
          dtype=dtype, remat=model.remat, **fields.get(name, {})))
  return loaded


def check_patchout(encoder, frames: int, patchout: tuple) -> None:
  """SettingError unless PaSST's patchout (time columns, frequency rows) drops fewer
  patches than its file's stride cuts from `frames` mel frames."""
  from ntxr.encoders import passt  # pylint: disable=import-outside-toplevel
  columns = int(passt.time_patches(frames, encoder.stride))
  rows = passt.freq_patches(encoder.stride)
  if patchout[0] >= columns or patchout[1] >= rows:
    raise settings.SettingError(
        f"--config.patchout={patchout}: PaSST (stride {encoder.stride}) cuts {columns} time "
        f"columns of patches from {frames} frames and {rows} frequency rows; patchout "
        f"drops fewer")


def checked_pretrained_encoders(run_settings: settings.Settings) -> dict:
  """`pretrained_encoders` of a run, PaSST's patchout checked against its first frame
  bucket. Each file is read once a process, so training calls this before preparing the
  data: a wrong file or patchout stops the run before."""
  data, model = run_settings.data, run_settings.model
  loaded = pretrained_encoders(model, data.cache_dir)
  if model.audio_encoder == "passt":
    check_patchout(loaded["audio"].module, data.frame_buckets[0], model.patchout)
  return loaded


@functools.lru_cache(maxsize=None)
def compiled_steps(devices: tuple, loss: settings.Loss) -> tuple:
  """(train_step, eval_loss) jitted over `devices` for one loss setting, shared by every
  Experiment in the process: a second run with the same settings (a sweep's next seed,
  a test) compiles nothing again."""
  mesh = parallel.Devices(devices)
  return (mesh.jit(functools.partial(steps.train_step, loss=loss, mesh=mesh.mesh),
                   donate_argnums=0),
          mesh.jit(functools.partial(steps.eval_loss, loss=loss, mesh=mesh.mesh)))


def mean_loss(losses: list) -> np.ndarray:
  """The float64 mean of a split's batch losses: device scalars (-> []), or vectors [R] of
  runs together (-> each run's [R])."""
  return np.mean(np.asarray(jax.device_get(losses), np.float64), axis=0)


def finite_validation_loss(loss) -> float:
  """One run's validation loss as a float; FloatingPointError if it is not finite."""
  if not np.isfinite(loss):
    raise FloatingPointError(f"validation loss is {loss}")
  return float(loss)


class Experiment:
  """The model and jitted functions of one setting on a prepared corpus (made by the data
  layer: `corpus_lib.load_data`, or `Experiment.of`), data-parallel over `devices`
  (default: all). Making one writes nothing."""

  def __init__(self, run_settings: settings.Settings, corpus: corpus_lib.Corpus,
               devices=None):
    self.settings = run_settings
    optimiser, data, model = run_settings.optimiser, run_settings.data, run_settings.model
    self.devices = parallel.Devices(devices)
    self.devices.check_divides("--config.batch_size", optimiser.batch_size)
    self.devices.check_divides("--config.eval_batch_size", optimiser.eval_batch_size)
    self.corpus = corpus
    self.training_split, self.validation_split, self.test_split = data.splits
    loaded = checked_pretrained_encoders(run_settings)
    dual_encoder = shared_model(vocab_size=corpus.tokenizer.vocab_size,
                                embed_dim=model.embed_dim, channels=model.channels,
                                dropout=model.dropout, initializer=model.initializer,
                                conv_precision=model.conv_precision or None,
                                pool_remainder=model.pool_remainder, dtype=model.compute_dtype,
                                frozen=settings.frozen_sides(model.frozen),
                                pooled_outputs=run_settings.loss.score == "pooled",
                                sentence_pooling=model.sentence_pooling,
                                **{f"{side}_encoder": encoder.module
                                   for side, encoder in loaded.items()})
    state = steps.create_train_state(
        dual_encoder, jax.random.key(run_settings.seed), frames=data.frame_buckets[0],
        words=data.max_tokens, mel_bands=corpus.feature_width,
        objective=run_settings.loss.objective, learning_rate=optimiser.learning_rate,
        word_table=corpus.word_table,
        pretrained={f"{side}_encoder": encoder.variables for side, encoder in loaded.items()},
        updates=self._updates(), batch_norm_pass=model.batch_norm_pass)
    similarity = run_settings.loss.similarity
    self.relations = relations_lib.CaptionRelations(
        corpus.builder, corpus.events, corpus.tokenizer, similarity, corpus.word_table,
        [c for _, captions in corpus.captions(self.training_split) for c in captions]
        if similarity == "tfidf" else [],
        vectors_split=self.training_split if run_settings.loss.memory_batches else None)
    if run_settings.loss.memory_batches:
      state = steps.with_memory(state, memory_lib.empty(
          state.apply_fn, state.variables(), batches=run_settings.loss.memory_batches,
          batch_size=optimiser.batch_size, frames=data.frame_buckets[-1],
          words=data.max_tokens, feature_width=corpus.feature_width,
          event_kinds=self.relations.event_kinds, vector_width=self.relations.vector_width))
    self.initial_state = self.devices.replicate(state)
    self._train_step, self._eval_loss = compiled_steps(
        tuple(self.devices.mesh.devices.flat), run_settings.loss)
    self.evaluation = evaluation_lib.Evaluation(run_settings, corpus, self.devices)

  @classmethod
  def of(cls, run_settings: settings.Settings, devices=None) -> "Experiment":
    """The Experiment of a setting on its data, prepared first (once: the cache keeps it)."""
    return cls(run_settings, corpus_lib.load_data(run_settings.data), devices)

  def device_batch(self, batch: dict, split: str) -> dict:
    """A global batch of numpy arrays of `split`, with its relations, on the devices."""
    return self.devices.shard(self.relations.add(batch, split))

  def train_step(self, state: steps.TrainState, batch: dict, key: jax.Array):
    """(state, TrainingStatistics) after one step on a `device_batch`; both stay on the
    devices (the step is dispatched, not waited for)."""
    return self._train_step(state, batch, key)

  def train_batches(self, split: str, seed: int):
    """A split's shuffled caption pairs in batches (tf.data), the last short one kept
    with --config.keep_partial_batch."""
    data, optimiser = self.settings.data, self.settings.optimiser
    return input_pipeline.train_batches(
        self.corpus.clips(split), self.corpus.tokenizer, batch_size=optimiser.batch_size,
        seed=seed, frame_buckets=data.frame_buckets, max_tokens=data.max_tokens,
        drop_remainder=not optimiser.keep_partial_batch)

  def _updates(self) -> steps.Updates:
    """The optimizer's updates beyond Adam at the learning rate (`steps.Updates`)."""
    optimiser, model = self.settings.optimiser, self.settings.model
    schedule = None
    if optimiser.lr_schedule == "warmup_cosine":
      cosine, steps_per_epoch = optimiser.warmup_cosine, self.steps_per_epoch()
      schedule = (round(cosine.warmup_epochs * steps_per_epoch),
                  round(cosine.decay_epochs * steps_per_epoch), cosine.min_lr)
    return steps.Updates(frozen=tuple((f"{side}_encoder",)
                                      for side in settings.frozen_sides(model.frozen)),
                         encoder_lr_factor=optimiser.encoder_lr_factor,
                         weight_decay=optimiser.weight_decay, warmup_cosine=schedule)

  def scheduled_rate(self, step: int) -> float:
    """The learning rate of optimizer step `step` under --config.lr_schedule=warmup_cosine."""
    warmup, decay, lowest = self._updates().warmup_cosine
    return float(steps.warmup_cosine(step, peak=self.settings.optimiser.learning_rate,
                                     warmup=warmup, decay=decay, lowest=lowest))

  def steps_per_epoch(self) -> int:
    """The training steps of an epoch: the training split's batches, at most
    --config.max_steps_per_epoch."""
    steps_per_epoch = self.batches_per_epoch(self.training_split)
    cap = self.settings.optimiser.max_steps_per_epoch
    return min(steps_per_epoch, cap) if cap else steps_per_epoch

  def batches_per_epoch(self, split: str) -> int:
    """Batches of caption pairs in a split (the last short one counted with
    --config.keep_partial_batch); raises ValueError if it has no full one, or if the
    short one does not split over the devices."""
    pairs = sum(len(captions) for _, captions in self.corpus.captions(split))
    size = self.settings.optimiser.batch_size
    if pairs < size:
      raise ValueError(f"the {split} split has {pairs} caption pairs, fewer than one batch "
                       f"of {size}: lower --config.batch_size")
    if not self.settings.optimiser.keep_partial_batch:
      return pairs // size
    if pairs % size % self.devices.count:
      raise settings.SettingError(
          f"--config.keep_partial_batch: the {split} split's last batch of {pairs % size} "
          f"pairs does not split over {self.devices.count} devices; set it to false")
    return -(-pairs // size)

  def validation_draws(self, epoch: int) -> tuple:
    """(random key, batch shuffle seed) of the validation loss after `epoch` epochs: the
    same every epoch, or with --config.validation_draws=per_epoch the epoch's own. Batch
    i draws with `fold_in(key, i)`: each batch its own draws, as the authors' loader."""
    seed = self.settings.seed
    key, shuffle = jax.random.key(seed), 0
    if self.settings.optimiser.validation_draws == "per_epoch":
      key, shuffle = jax.random.fold_in(key, epoch), epoch_seed(seed, epoch, 1)
    return key, shuffle

  def validation_batches(self, seed: int):
    """The validation split's batches (numpy) shuffled by `seed`, as training makes them."""
    return input_pipeline.as_numpy(self.train_batches(self.validation_split, seed))

  def validation_loss(self, state: steps.TrainState, epoch: int) -> float:
    """The mean loss of the validation split's batches after `epoch` epochs (0: the
    untrained model), drawn as `validation_draws` says."""
    key, seed = self.validation_draws(epoch)
    batches = parallel.prefetch(self.validation_batches(seed),
                                lambda batch: self.device_batch(batch, self.validation_split))
    return finite_validation_loss(mean_loss([
        self._eval_loss(state, batch, jax.random.fold_in(key, index))
        for index, batch in enumerate(batches)]))

  def validate(self, state: steps.TrainState, training: dict, epoch: int) -> tuple:
    """(validation {"loss", "t2a", "a2t"}, Collapse) on the validation split after
    `epoch` epochs. training: the epoch's mean TrainingStatistics, for Collapse."""
    evaluation = self.evaluation
    split = evaluation.embed_split(state, self.validation_split)
    return evaluation.validation_results(self.validation_loss(state, epoch), split,
                                         evaluation.runs_scores([split])[0], training)
