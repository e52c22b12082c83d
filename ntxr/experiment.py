"""One config's data, model and jitted functions: what the training loop works with.

`Experiment(config, corpus)` reads the word vectors of a prepared corpus, builds the
model and its first train state, and jits the steps data-parallel over the devices; its
methods feed them batches of a split and embed, validate and test.
`Experiment.of(config)` prepares the corpus first.
"""

import functools
from typing import Optional

from absl import logging
import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from ntxr import dcase, embedder as embedder_lib, evaluate, models, parallel
from ntxr import relations as relations_lib, relevance, settings, steps
from ntxr.data import corpus as corpus_lib, input_pipeline, word_vectors


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
def compiled_steps(devices: tuple, loss: settings.Loss) -> tuple:
  """(train_step, eval_loss) jitted over `devices` for one loss setting, shared by every
  Experiment in the process: a second run with the same settings (a sweep's next seed,
  a test) compiles nothing again."""
  mesh = parallel.Devices(devices)
  return (mesh.jit(functools.partial(steps.train_step, loss=loss), donate_argnums=0),
          mesh.jit(functools.partial(steps.eval_loss, loss=loss)))


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
  """The data, model and jitted functions of one config on a prepared corpus (made by the
  data layer: `corpus_lib.load_data`, or `Experiment.of`), data-parallel over `devices`
  (default: all). Making one writes nothing."""

  def __init__(self, config: ml_collections.ConfigDict, corpus: corpus_lib.Corpus,
               devices=None):
    self.config = config
    self.settings = settings.Settings.of(config)
    self.devices = parallel.Devices(devices)
    self.devices.check_divides("--config.batch_size", config.batch_size)
    self.devices.check_divides("--config.eval_batch_size", config.eval_batch_size)
    self.corpus = corpus
    self.builder, self.tokenizer = self.corpus.builder, self.corpus.tokenizer
    self.training_split = self.corpus.splits[0]
    self.validation_split = config.validation_split or self.corpus.splits[1]
    self.test_split = config.test_split or self.corpus.splits[2]
    model_settings = self.settings.model
    model = shared_model(vocab_size=self.tokenizer.vocab_size,
                         embed_dim=model_settings.embed_dim, channels=model_settings.channels,
                         dropout=model_settings.dropout,
                         initializer=model_settings.initializer,
                         pool_remainder=model_settings.pool_remainder,
                         dtype=model_settings.compute_dtype)
    self.word_table = self._word_table()
    self.initial_state = self.devices.replicate(steps.create_train_state(
        model, jax.random.key(config.seed), frames=config.frame_buckets[0],
        words=config.max_tokens, mel_bands=self.builder.builder_config.logmel.mel_bands,
        objective=config.objective, learning_rate=config.learning_rate,
        word_table=self.word_table))
    self.relations = relations_lib.CaptionRelations(
        self.builder, self.corpus.events, self.tokenizer, self.settings.loss.similarity,
        self.word_table, [c for _, captions in self.captions(self.training_split)
                          for c in captions] if self.settings.loss.similarity == "tfidf" else [])
    self._train_step, self._eval_loss = compiled_steps(
        tuple(self.devices.mesh.devices.flat), self.settings.loss)
    # People's judgements of the test split, read now so that a bad file stops the run
    # before it trains.
    data = self.settings.data
    relevance_file = data.relevance_file or self.corpus.relevance_file
    self.relevant = relevance.read_dcase2025(relevance_file) if relevance_file else None
    # What each judged metric is judged against, for results.json: the built-in corpus
    # writes its own relevance file from its clips' events.
    built_in = relevance_file == self.corpus.relevance_file and self.corpus.events is not None
    self.judged_against = dict(
        t2a_multi="built-in corpus events" if built_in else relevance_file,
        t2a_graded=data.graded_relevance_dir)
    self.rated = None
    if data.graded_relevance_dir:
      self.rated = relevance.read_tau(data.graded_relevance_dir, self.test_split).ratings

  @classmethod
  def of(cls, config: ml_collections.ConfigDict, devices=None) -> "Experiment":
    """The Experiment of `config` on its data, prepared first (once: the cache keeps it)."""
    return cls(config, corpus_lib.load_data(settings.Settings.of(config).data), devices)

  def _word_table(self) -> Optional[np.ndarray]:
    """The frozen word2vec table of config.word_vectors, or None to learn one."""
    if not self.config.word_vectors:
      return None
    table, missing = word_vectors.read_word2vec(
        self.config.word_vectors, self.tokenizer.words,
        missing=self.config.missing_word_vectors, variants=self.config.word_variants)
    if missing:
      logging.warning("word vectors: %d of %d words are not in %s and get %s vectors "
                      "(frozen), the first: %s", len(missing), len(self.tokenizer.words),
                      self.config.word_vectors,
                      "one shared UNK" if self.config.missing_word_vectors == "one_unk"
                      else "random", ", ".join(missing[:10]))
    return table

  def device_batch(self, batch: dict, split: str) -> dict:
    """A global batch of numpy arrays of `split`, with its relations, on the devices."""
    return self.devices.shard(self.relations.add(batch, split))

  def train_step(self, state: steps.TrainState, batch: dict, key: jax.Array):
    """(state, TrainingStatistics) after one step on a `device_batch`; both stay on the
    devices (the step is dispatched, not waited for)."""
    return self._train_step(state, batch, key)

  def clips(self, split: str):
    return self.builder.as_dataset(split=split)

  def train_batches(self, split: str, seed: int):
    """A split's shuffled caption pairs in batches (tf.data), the last short one kept
    with --config.keep_partial_batch."""
    return input_pipeline.train_batches(
        self.clips(split), self.tokenizer, batch_size=self.config.batch_size, seed=seed,
        frame_buckets=self.config.frame_buckets, max_tokens=self.config.max_tokens,
        drop_remainder=not self.config.keep_partial_batch)

  def captions(self, split: str) -> list:
    """[(file_name, [captions])] of a split's clips in order, without decoding audio."""
    clips = self.builder.as_dataset(split=split,
                                    decoders={"logmel": tfds.decode.SkipDecoding()})
    return [(c["file_name"].decode(), [x.decode() for x in c["captions"]])
            for c in tfds.as_numpy(clips)]

  def batches_per_epoch(self, split: str) -> int:
    """Batches of caption pairs in a split (the last short one counted with
    --config.keep_partial_batch); raises ValueError if it has no full one, or if the
    short one does not split over the devices."""
    pairs = sum(len(captions) for _, captions in self.captions(split))
    size = self.config.batch_size
    if pairs < size:
      raise ValueError(f"the {split} split has {pairs} caption pairs, fewer than one batch "
                       f"of {size}: lower --config.batch_size")
    if not self.config.keep_partial_batch:
      return pairs // size
    if pairs % size % self.devices.count:
      raise settings.SettingError(
          f"--config.keep_partial_batch: the {split} split's last batch of {pairs % size} "
          f"pairs does not split over {self.devices.count} devices; set it to false")
    return -(-pairs // size)

  def embedder(self, state: steps.TrainState, runs: bool = False) -> embedder_lib.Embedder:
    """Embeds clips and captions with `state` (with runs: the stacked states of runs
    trained together, a RunsEmbedder), as this experiment's data is shaped."""
    config = self.config
    kind = embedder_lib.RunsEmbedder if runs else embedder_lib.Embedder
    return kind(state, self.devices, tokenizer=self.tokenizer,
                frame_buckets=tuple(config.frame_buckets), max_tokens=config.max_tokens,
                batch_size=config.eval_batch_size)

  def embed_split(self, state: steps.TrainState, split: str) -> evaluate.SplitEmbeddings:
    """Every clip and caption of a split embedded, in order."""
    return self.embedder(state).split(self.clips(split))

  def embed_split_runs(self, states: steps.TrainState, split: str) -> list:
    """`embed_split` by each of the R runs whose states are stacked (one pass over the
    split): their R SplitEmbeddings, in the runs' order."""
    return self.embedder(self.devices.replicate(states), runs=True).splits(self.clips(split))

  def validation_draws(self, epoch: int) -> tuple:
    """(random key, batch shuffle seed) of the validation loss after `epoch` epochs: the
    same every epoch, or with --config.validation_draws=per_epoch the epoch's own."""
    key, seed = jax.random.key(self.config.seed), 0
    if self.config.validation_draws == "per_epoch":
      key, seed = jax.random.fold_in(key, epoch), epoch_seed(self.config.seed, epoch, 1)
    return key, seed

  def validation_batches(self, seed: int):
    """The validation split's batches (numpy) shuffled by `seed`, as training makes them."""
    return input_pipeline.as_numpy(self.train_batches(self.validation_split, seed))

  def validation_loss(self, state: steps.TrainState, epoch: int) -> float:
    """The mean loss of the validation split's batches after `epoch` epochs (0: the
    untrained model), drawn as `validation_draws` says."""
    key, seed = self.validation_draws(epoch)
    batches = parallel.prefetch(self.validation_batches(seed),
                                lambda batch: self.device_batch(batch, self.validation_split))
    return finite_validation_loss(mean_loss([self._eval_loss(state, batch, key)
                                             for batch in batches]))

  def runs_scores(self, splits: list) -> np.ndarray:
    """[R, clips, captions]: the split embedded by R runs (`embed_split_runs`, or one
    run's `embed_split` alone) scored, all runs in one program per block; unchecked
    (`evaluate.finite_scores`)."""
    return evaluate.runs_scores(splits, self.config.score)

  def validate(self, state: steps.TrainState, training: dict, epoch: int) -> tuple:
    """(validation {"loss", "t2a", "a2t"}, Collapse) on the validation split after
    `epoch` epochs. training: the epoch's mean TrainingStatistics, for Collapse."""
    split = self.embed_split(state, self.validation_split)
    return self.validation_results(self.validation_loss(state, epoch), split,
                                   self.runs_scores([split])[0], training)

  def validation_results(self, loss: float, split: evaluate.SplitEmbeddings, s: np.ndarray,
                         training: dict) -> tuple:
    """`validate`'s results from the validation loss, the split's embeddings and their
    scores s [clips, captions]; FloatingPointError if either is not finite."""
    metrics = evaluate.both_directions(evaluate.finite_scores(split, s), split.clip_ids,
                                       split.caption_ids)
    collapse = evaluate.collapse_diagnostics(
        split.audio, split.audio_mask, split.text, split.text_mask, training,
        self.config.collapse.to_dict())
    return dict(loss=loss, **metrics), collapse

  def test(self, state: steps.TrainState) -> tuple:
    """(test-split metrics, score histogram and what the judged metrics were judged
    against, its DCASE Submission or None when the split has fewer clips than a
    submission ranks, and its DCASE 2025 score matrix (a Submission of the judged
    captions) or None without a relevance file)."""
    split = self.embed_split(state, self.test_split)
    return self.test_results(split, self.runs_scores([split])[0])

  def test_results(self, split: evaluate.SplitEmbeddings, s: np.ndarray) -> tuple:
    """`test`'s results from the test split's embeddings and their scores s [clips,
    captions]; FloatingPointError if either is not finite."""
    s = evaluate.finite_scores(split, s)
    names = self.captions(self.test_split)
    texts, file_names = [c for _, captions in names for c in captions], [f for f, _ in names]
    submission = None
    if len(names) >= dcase.RANKED:
      submission = dcase.Submission(texts, file_names, s.T)
    metrics = dict(evaluate.both_directions(s, split.clip_ids, split.caption_ids),
                   score_histogram=evaluate.score_histogram(s, split.clip_ids,
                                                            split.caption_ids))
    judged, matrix = self._judged_by_people(texts, file_names, s.T)
    return dict(metrics, **judged, judged_against={
        name: self.judged_against[name] for name in judged}), submission, matrix

  def _judged_by_people(self, texts: list, file_names: list, s: np.ndarray) -> tuple:
    """({"t2a_multi", "t2a_graded"} as measured, the DCASE 2025 score matrix or None)
    from the test split's scores s [captions, clips]; only the judged captions that are
    the split's count (a warning says how many are not)."""
    row = relevance.first_rows(texts)
    judged, matrix = {}, None
    relevant = self._in_split("t2a_multi", self.relevant, row)
    if relevant:
      rows = s[[row[text] for text in relevant]]
      judged["t2a_multi"] = relevance.multi_relevance_metrics(
          relevant, relevance.ranked_by_score(list(relevant), file_names, rows))
      matrix = dcase.Submission(list(relevant), file_names, rows)
    rated = self._in_split("t2a_graded", self.rated, row)
    if rated:
      judged["t2a_graded"] = relevance.graded_metrics(rated, relevance.ranked_by_score(
          list(rated), file_names, s[[row[text] for text in rated]]))
    return judged, matrix

  def _in_split(self, name: str, judged: Optional[dict], captions: dict) -> dict:
    """The entries of `judged` ({caption: judgement} or None) whose caption is one of the
    test split's `captions`; a warning names how many are not."""
    known = {text: value for text, value in (judged or {}).items() if text in captions}
    if len(known) < len(judged or {}):
      logging.warning("%s: %d of the %d judged captions are not captions of the %s split; "
                      "the other %d are scored", name, len(judged) - len(known), len(judged),
                      self.test_split, len(known))
    return known
