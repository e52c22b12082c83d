"""The config as typed settings, every field checked here before anything is written.

  settings = Settings.of(config)   # SettingError (a ValueError) naming the field
  settings.data.features, settings.model, settings.loss, settings.optimiser,
  settings.checkpoints, settings.collapse

`check(workdir, config)` also checks the workdir and the run it may hold; `write(workdir,
config)` then writes config.json. A field's allowed values are defined beside the code
that reads it: here, or in the module that does (the strategies and objectives in `specs`,
the scores in `scores`, the encoders' dtypes, initialisers and pools in `models`, the
corpus sizes and text cleaning in `data`); those that load JAX are imported only when a
config is checked, so the data modules that read `Features` load no JAX.

The config stays flat, as the Flax examples keep theirs: every `--config.FIELD=VALUE`
reads as it always has, and a workdir's config.json stays one flat dict.
"""

import dataclasses
import json
import math
import os
from typing import Optional

import ml_collections

from ntxr import files, layouts, specs

# Config fields that change nothing a run computes, only how often it saves and reads,
# where it caches and how many clips it embeds at once.
OPERATIONAL = ("checkpoint_every_steps", "metrics_every_steps", "cache_dir", "stage_dir",
               "eval_batch_size")
# Config fields a resumed run may change (they leave training as it was, and a finished
# run with more epochs trains on); any other change needs a new workdir.
RESUMABLE_CHANGES = (*OPERATIONAL, "num_epochs", "collapse",
                     "batch_norm_pass",  # it sets the initial state a checkpoint replaces
                     "negatives")  # ring computes what gather does, in less memory
# The fields that may differ between runs trained together (`ntxr.programs`).
PER_RUN = ("strategy", "objective", "seed")
# Paths: "/data/clotho/" and "/data/clotho" name one folder.
PATHS = ("data_dir", "cache_dir", "stage_dir", "word_vectors", "relevance_file",
         "graded_relevance_dir", "audio_weights", "text_weights")

# The least value of the numeric fields that have one.
AT_LEAST = dict(batch_size=2, eval_batch_size=1, num_epochs=1, max_steps_per_epoch=0,
                checkpoint_every_steps=1, metrics_every_steps=1, max_tokens=1, embed_dim=1,
                vocab_size=2, margin=0, temperature=1e-6, beta=0, learning_rate=1e-12,
                weight_decay=0, encoder_lr_factor=1e-6,
                filter_similarity=0, filter_share_of_positive=0, n_fft=0, f_min=0, f_max=0,
                log_offset=1e-30, memory_batches=0)
# The most of the numeric fields that have one: Adam's steps grow with its rate, and
# above 1 every run diverges.
AT_MOST = dict(learning_rate=1.0)
MIN_SAMPLE_RATE = 8000  # a 40 ms window of 64 mel bands needs at least this

TOKENS = ("sentencepiece", "words")  # "pretrained": the text encoder's own, set by it
AUDIO_ENCODERS = ("crnn", "cnn14", "passt")  # beside the paper's CRNN, ntxr.encoders'
TEXT_ENCODERS = ("word_vectors", "bert", "roberta")
# The pretrained audio encoders read waveforms at this rate, in frames of HOP samples.
PRETRAINED_SAMPLE_RATE, PRETRAINED_HOP = 32000, 320
PASST_FRAMES = 1000  # 10 s: the released PaSST files' time embedding holds no more
PASST_PATCH = 16  # PaSST's patches are 16 mel frames wide
FROZEN = ("", "audio", "text", "both")  # which pretrained encoders run as published
LR_SCHEDULES = ("plateau", "warmup_cosine")  # see Optimiser
VOCABULARIES = ("training", "all")  # which splits' captions a tokenizer learns from
MISSING_WORD_VECTORS = ("random", "one_unk")
PADDINGS = ("masked", "batch")  # see steps.training_masks
WORD_VARIANTS = ("rules", "authors")  # see data.word_vectors.read_word2vec
VALIDATION_DRAWS = ("fixed", "per_epoch")  # see Optimiser
NEGATIVES = ("gather", "ring")  # see Loss
MATMUL_PRECISIONS = ("default", "high", "highest")  # jax.default_matmul_precision's
SIMILARITIES = ("tfidf", "word_vectors", "events")  # see ntxr.false_negatives

# How the reported ("best") checkpoint is chosen from each epoch's validation: the
# higher the better.
SELECTIONS = {
    "t2a_mAP@10": lambda validation: validation["t2a"]["mAP@10"],
    "validation_loss": lambda validation: -validation["loss"],  # the authors' choice
}


class SettingError(ValueError):
  """A setting the user must change before anything runs (usage: exit status 2)."""


@dataclasses.dataclass(frozen=True)
class Features:
  """Log-mel parameters, or waveform frames; `name` encodes all of them, so a change
  re-prepares.

  sample_rate 0 means the corpus's own default (16 kHz synthetic, 44.1 kHz a data folder);
  n_fft 0 means the window length; f_max 0 means the Nyquist frequency. The paper's
  (their `audio_logmel.py`): n_fft 2048, f_min 12, f_max 8000, log_offset 2.2e-16.
  waveform_hop > 0: no log-mel, the waveform itself in frames of that many samples
  [frames, waveform_hop] (the last zero-padded), for encoders with their own front end.
  """
  sample_rate: int = 0
  window_ms: float = 40.0
  hop_ms: float = 20.0
  mel_bands: int = 64
  n_fft: int = 0
  f_min: float = 0.0
  f_max: float = 0.0
  log_offset: float = 1e-8
  waveform_hop: int = 0

  @property
  def width(self) -> int:
    """A frame's values: mel bands, or waveform samples."""
    return self.waveform_hop or self.mel_bands

  @property
  def hop_seconds(self) -> float:
    """The time from one frame to the next."""
    return self.waveform_hop / self.sample_rate if self.waveform_hop else self.hop_ms / 1000

  @property
  def name(self) -> str:
    if self.waveform_hop:
      return f"sr{self.sample_rate}_wave{self.waveform_hop}"
    return (f"sr{self.sample_rate}_win{self.window_ms:g}_hop{self.hop_ms:g}_fft{self.n_fft}"
            f"_mel{self.mel_bands}_f{self.f_min:g}-{self.f_max:g}_off{self.log_offset:g}"
            ).replace(".", "p")


@dataclasses.dataclass(frozen=True)
class Data:
  """What a run trains and is tested on (`ntxr.data.corpus.load` takes these).

  data_dir: a Clotho, AudioCaps or pairs folder, or None for the built-in corpus of
  `size`. tokens: "words" whenever word vectors are given, "pretrained" (the tokenizer of
  the text encoder's folder, text_weights) with a pretrained text encoder. splits: the (training,
  validation, test) split names, the last two as --config.validation_split and
  test_split choose from the data set's own. relevance_file: DCASE 2025's matching clips
  per test caption ("": the one beside the captions, if any); graded_relevance_dir: the
  TAU ratings' folder ("": none).
  """
  data_dir: Optional[str]
  size: str
  cache_dir: str
  stage_dir: str
  features: Features
  tokens: str
  vocab_size: int
  text_cleaning: str
  vocabulary: str
  word_vectors: str
  text_weights: str
  missing_word_vectors: str
  word_variants: str
  frame_buckets: tuple
  max_tokens: int
  skip_bad_files: bool
  splits: tuple
  relevance_file: str
  graded_relevance_dir: str


@dataclasses.dataclass(frozen=True)
class Model:
  """The dual encoder's fields other than its vocabulary (`models.DualEncoder`), and
  its pretrained encoders' names and files (`ntxr.encoders`; "crnn" and "word_vectors":
  the paper's, trained from scratch). remat: the pretrained encoders recompute each
  block's activations for the gradient; patchout: PaSST's structured patchout in
  training, (time columns, frequency rows) dropped; frozen (a name in FROZEN): those
  pretrained encoders run as published (inference mode, no gradient, no updates), their
  projections trained. batch_norm_pass: the authors' construction pass
  (`steps.create_train_state`); conv_precision: the CRNN's convolutions' (""
  matmul_precision's; PyTorch 1.13 runs them in TF32 on Ampere and Hopper GPUs).
  sentence_pooling ("cls" or "mean") and text_dropout (below 0: the file's): the
  pretrained text encoder's (`models.PretrainedText`)."""
  audio_encoder: str
  audio_weights: str
  text_encoder: str
  text_weights: str
  embed_dim: int
  channels: tuple
  dropout: float
  initializer: str
  compute_dtype: str
  pool_remainder: str
  remat: bool
  patchout: tuple
  frozen: str
  batch_norm_pass: bool
  conv_precision: str
  sentence_pooling: str
  text_dropout: float


@dataclasses.dataclass(frozen=True)
class Loss:
  """What a batch's loss is; hashable, so jit compiles one step per setting.

  objective: a name in `specs.OBJECTIVES`; "triplet" takes one negative per anchor,
  chosen by `strategy` (a name in `specs.STRATEGIES`), with hinge `margin`; the others
  score the whole pool (`temperature`, hn_nce's `beta`, soft's relevance
  sigmoid(relevance_slope * similarity - relevance_offset)). score and padding: see
  `scores` and `steps.training_masks`. similarity: how captions are compared (see
  `false_negatives`, "" for not at all). filter_similarity, filter_share_of_positive: the
  false-negative filter's bounds (`false_negatives.filter_pool`; 0 is off). negatives:
  "gather" (the step's score matrices over the global batch) or "ring" (each device
  scores its anchors against the others' embeddings passed round, `ntxr.ring`).
  memory_batches: K above 0 adds the last K batches' embeddings to every anchor's
  candidates (`ntxr.memory`).
  """
  objective: str = "triplet"
  strategy: str = "semihard_cross"
  margin: float = 0.5
  score: str = "alignment"
  padding: str = "masked"
  temperature: float = 0.05
  beta: float = 0.0
  similarity: str = ""
  relevance_slope: float = 10.0
  relevance_offset: float = 5.0
  filter_similarity: float = 0.0
  filter_share_of_positive: float = 0.0
  negatives: str = "gather"
  memory_batches: int = 0

  @property
  def filters(self) -> bool:
    return bool(self.filter_similarity or self.filter_share_of_positive)

  @property
  def compares_captions(self) -> bool:
    """Whether the loss reads the caption similarity (the filter's bound, soft's relevance)."""
    return self.filter_similarity > 0 or specs.OBJECTIVES[self.objective].needs_relevance


@dataclasses.dataclass(frozen=True)
class Schedule:
  """ReduceLROnPlateau's options (mode min, absolute threshold), on the validation loss."""
  factor: float = 0.1
  patience: int = 5
  threshold: float = 0.005
  min_lr: float = 1e-6


@dataclasses.dataclass(frozen=True)
class Stopper:
  """Ray Tune's TrialPlateauStopper on the validation loss (`train.plateau_stop`): stop
  once `grace_period` results are in and the population standard deviation of the last
  `num_results` is below `std`. std 0: never stop."""
  std: float = 0.0
  num_results: int = 10
  grace_period: int = 60


@dataclasses.dataclass(frozen=True)
class WarmupCosine:
  """The per-step learning rate of `steps.warmup_cosine`, in epochs of steps: from min_lr
  up to the learning rate over warmup_epochs, down to min_lr over decay_epochs."""
  warmup_epochs: float = 1.0
  decay_epochs: float = 15.0
  min_lr: float = 1e-7


@dataclasses.dataclass(frozen=True)
class Optimiser:
  """Adam's batches, epochs and learning rate with its schedule (lr_schedule: "plateau",
  per epoch on the validation loss, or "warmup_cosine", per step), and how the
  validation loss that drives the plateau and the stopper is drawn.

  weight_decay: above 0, AdamW's decoupled decay. encoder_lr_factor: the pretrained
  encoders' learning rate is the learning rate times this (their projections and the
  objective's scalars train at the learning rate).

  keep_partial_batch: an epoch's last batch, short of batch_size, is used (the
  authors'), not dropped. validation_draws: the validation loss's batches and random
  draws are the same every epoch ("fixed") or reshuffled and drawn anew each epoch, from
  the epoch's own seed ("per_epoch", as the authors' loaders, yet a resumed run stays
  exact). schedule_from_untrained: the untrained model's validation loss is the
  schedule's and the stopper's first value (the authors' epoch 0).
  """
  learning_rate: float
  schedule: Schedule
  stopper: Stopper
  lr_schedule: str
  warmup_cosine: WarmupCosine
  weight_decay: float
  encoder_lr_factor: float
  batch_size: int
  eval_batch_size: int
  num_epochs: int
  max_steps_per_epoch: int  # 0: the whole training split
  keep_partial_batch: bool
  validation_draws: str
  schedule_from_untrained: bool


@dataclasses.dataclass(frozen=True)
class Checkpoints:
  """How often a run saves and reads its steps, and which epoch it reports (`SELECTIONS`)."""
  every_steps: int
  metrics_every_steps: int
  select_by: str


@dataclasses.dataclass(frozen=True)
class Collapse:
  """The feature-collapse thresholds (`evaluate.collapse_diagnostics`)."""
  cosine: float
  effective_rank: float
  share_at_margin: float
  score_std: float


@dataclasses.dataclass(frozen=True)
class Settings:
  """A config's settings by group, checked (`Settings.of`). matmul_precision: of every
  jitted program (`jax.default_matmul_precision`; "highest" is full float32)."""
  seed: int
  matmul_precision: str
  data: Data
  model: Model
  loss: Loss
  optimiser: Optimiser
  checkpoints: Checkpoints
  collapse: Collapse

  @property
  def run_name(self) -> str:
    """The run's setting in a word (`specs.run_name`)."""
    return specs.run_name(self.loss.objective, self.loss.strategy)

  @classmethod
  def of(cls, config: ml_collections.ConfigDict) -> "Settings":
    """The checked settings of a config; SettingError naming the first bad field."""
    check_values(config)
    _check_paths(config)
    c = config
    splits = _splits(config)
    return cls(
        seed=c.seed, matmul_precision=c.matmul_precision,
        data=Data(
            data_dir=os.path.expanduser(c.data_dir) if c.data_dir else None, size=c.size,
            cache_dir=os.path.expanduser(c.cache_dir),
            stage_dir=c.stage_dir, features=_features(c),
            tokens=("pretrained" if c.text_encoder != "word_vectors" else
                    "words" if c.word_vectors else c.tokens), vocab_size=c.vocab_size,
            text_cleaning=c.text_cleaning, vocabulary=c.vocabulary, word_vectors=c.word_vectors,
            text_weights=os.path.expanduser(c.text_weights),
            missing_word_vectors=c.missing_word_vectors, word_variants=c.word_variants,
            frame_buckets=tuple(c.frame_buckets),
            max_tokens=c.max_tokens, skip_bad_files=c.skip_bad_files,
            splits=splits,
            relevance_file=os.path.expanduser(c.relevance_file),
            graded_relevance_dir=os.path.expanduser(c.graded_relevance_dir)),
        model=Model(audio_encoder=c.audio_encoder,
                    audio_weights=os.path.expanduser(c.audio_weights),
                    text_encoder=c.text_encoder,
                    text_weights=os.path.expanduser(c.text_weights), embed_dim=c.embed_dim,
                    channels=tuple(c.channels), dropout=c.dropout,
                    initializer=c.initializer, compute_dtype=c.compute_dtype,
                    pool_remainder=c.pool_remainder, remat=c.remat,
                    patchout=tuple(c.patchout), frozen=c.frozen,
                    batch_norm_pass=c.batch_norm_pass and c.audio_encoder == "crnn",
                    conv_precision=c.conv_precision if c.audio_encoder == "crnn" else "",
                    sentence_pooling=c.sentence_pooling, text_dropout=c.text_dropout),
        loss=Loss(objective=c.objective, strategy=c.strategy, margin=c.margin, score=c.score,
                  padding=c.train_padding, temperature=c.temperature, beta=c.beta,
                  similarity=c.similarity, relevance_slope=c.relevance_slope,
                  relevance_offset=c.relevance_offset, filter_similarity=c.filter_similarity,
                  filter_share_of_positive=c.filter_share_of_positive,
                  negatives=c.negatives, memory_batches=c.memory_batches),
        optimiser=Optimiser(
            learning_rate=c.learning_rate, schedule=Schedule(**c.plateau.to_dict()),
            stopper=Stopper(**c.stopper.to_dict()), lr_schedule=c.lr_schedule,
            warmup_cosine=WarmupCosine(**c.warmup_cosine.to_dict()),
            weight_decay=c.weight_decay, encoder_lr_factor=c.encoder_lr_factor,
            batch_size=c.batch_size,
            eval_batch_size=c.eval_batch_size, num_epochs=c.num_epochs,
            max_steps_per_epoch=c.max_steps_per_epoch,
            keep_partial_batch=c.keep_partial_batch, validation_draws=c.validation_draws,
            schedule_from_untrained=c.schedule_from_untrained),
        checkpoints=Checkpoints(every_steps=c.checkpoint_every_steps,
                                metrics_every_steps=c.metrics_every_steps,
                                select_by=c.select_by),
        collapse=Collapse(**c.collapse.to_dict()))


def _features(config: ml_collections.ConfigDict) -> Features:
  """The clips' features: the config's log-mel for the CRNN, else waveform frames at the
  pretrained encoders' rate."""
  if config.audio_encoder != "crnn":
    return Features(sample_rate=PRETRAINED_SAMPLE_RATE, waveform_hop=PRETRAINED_HOP)
  return Features(sample_rate=config.sample_rate, n_fft=config.n_fft, f_min=config.f_min,
                  f_max=config.f_max, log_offset=config.log_offset)


def _choose(field: str, value, choices) -> None:
  if value not in choices:
    raise SettingError(f"--config.{field} must be one of {list(choices)}, not {value!r}")


def _check_passt(buckets: tuple) -> None:
  """PaSST's frames: one bucket (it attends to every patch, padding too, so a clip's
  embedding would depend on its batch's padding; one length pads every clip alike) of
  one patch to PASST_FRAMES frames. (Its patchout against its file's patches:
  `experiment.check_patchout`.)"""
  if len(buckets) != 1 or not PASST_PATCH <= buckets[0] <= PASST_FRAMES:
    raise SettingError(
        f"--config.frame_buckets: PaSST reads one length, {PASST_PATCH} to {PASST_FRAMES} "
        f"frames of {PRETRAINED_HOP} samples (10 s at most): it attends to every patch, "
        f"padding too, so every clip is padded to one length; give one bucket, e.g. "
        f"--config.frame_buckets=\"({PASST_FRAMES},)\", not {buckets}")


def frozen_sides(frozen: str) -> tuple:
  """The sides ("audio", "text") that --config.frozen (a name in FROZEN) freezes."""
  return {"": (), "both": ("audio", "text")}.get(frozen, (frozen,))


def _check_fine_tuning(config: ml_collections.ConfigDict) -> None:
  """Raises SettingError for a fine-tuning field given without the encoder it is for."""
  pretrained = [side for side, paper in (("audio", "crnn"), ("text", "word_vectors"))
                if config[f"{side}_encoder"] != paper]
  frozen = frozen_sides(config.frozen)
  for side in frozen:
    if side not in pretrained:
      raise SettingError(f"--config.frozen={config.frozen}: the {side} encoder is the "
                         f"paper's, trained from scratch; freeze a pretrained one "
                         f"(--config.{side}_encoder)")
  if config.text_dropout >= 1 or (config.text_dropout < 0 and config.text_dropout != -1):
    raise SettingError(f"--config.text_dropout must be at least 0 and below 1, or -1 for "
                       f"the text encoder's config.json's, not {config.text_dropout}")
  if "text" not in pretrained and (config.text_dropout != -1
                                   or config.sentence_pooling != "cls"):
    raise SettingError("--config.text_dropout and --config.sentence_pooling are for a "
                       "pretrained text encoder (--config.text_encoder=bert|roberta)")
  for given, reason in (
      (config.sentence_pooling != "cls" and config.score != "pooled",
       "--config.sentence_pooling is the pooled score's: give it with --config.score=pooled"),
      (tuple(config.patchout) != (0, 0) and "audio" in frozen,
       "--config.patchout is PaSST's in training: a frozen audio encoder runs without it"),
      (config.text_dropout != -1 and "text" in frozen,
       "--config.text_dropout is the text encoder's in training: a frozen one runs without"),
      (config.encoder_lr_factor != 1 and pretrained and set(pretrained) <= set(frozen),
       "--config.encoder_lr_factor: every pretrained encoder is frozen"),
      (config.lr_schedule == "plateau"
       and WarmupCosine(**config.warmup_cosine.to_dict()) != WarmupCosine(),
       "--config.warmup_cosine is --config.lr_schedule=warmup_cosine's"),
      (config.lr_schedule != "plateau" and Schedule(**config.plateau.to_dict()) != Schedule(),
       "--config.plateau is --config.lr_schedule=plateau's")):
    if given:
      raise SettingError(reason)
  if not pretrained and (config.remat or config.encoder_lr_factor != 1):
    raise SettingError("--config.remat and --config.encoder_lr_factor are for pretrained "
                       "encoders (--config.audio_encoder=cnn14|passt, "
                       "--config.text_encoder=bert|roberta)")
  patchout = tuple(config.patchout)
  if len(patchout) != 2 or any(not isinstance(n, int) or n < 0 for n in patchout):
    raise SettingError(f"--config.patchout must be two counts (time, frequency) of at "
                       f"least 0, not {patchout}")
  if patchout != (0, 0) and config.audio_encoder != "passt":
    raise SettingError(f"--config.patchout={patchout} is PaSST's: give it with "
                       f"--config.audio_encoder=passt")
  if (config.lr_schedule == "warmup_cosine"
      and config.warmup_cosine.min_lr > config.learning_rate):
    raise SettingError(f"--config.warmup_cosine.min_lr ({config.warmup_cosine.min_lr:g}) "
                       f"must be at most --config.learning_rate ({config.learning_rate:g}), "
                       f"the schedule's peak")


# The fields only the paper's encoders read: the CRNN and its log-mel, the word table's
# tokens. A pretrained encoder reads its own (waveforms at 32 kHz, its file's statistics
# and tokenizer), so with one these fields are off in the typed settings.
CRNN_FIELDS = ("sample_rate", "n_fft", "f_min", "f_max", "log_offset", "channels",
               "dropout", "initializer", "pool_remainder", "batch_norm_pass",
               "conv_precision")
WORD_TABLE_FIELDS = ("tokens", "vocab_size", "vocabulary", "missing_word_vectors",
                     "word_variants")


def unused_fields(config: ml_collections.ConfigDict) -> list:
  """The fields of `config` set away from the default config's that its encoders do not
  read (a pretrained audio encoder ignores CRNN_FIELDS, a pretrained text encoder
  WORD_TABLE_FIELDS), as "name=value"."""
  from ntxr.configs import default  # pylint: disable=import-outside-toplevel
  defaults = default.get_config()
  unread = ((CRNN_FIELDS if config.audio_encoder != "crnn" else ())
            + (WORD_TABLE_FIELDS if config.text_encoder != "word_vectors" else ()))
  def value(config, field):
    return tuple(config[field]) if isinstance(config[field], (list, tuple)) else config[field]
  return [f"{field}={value(config, field)}" for field in unread
          if value(config, field) != value(defaults, field)]


def check_values(config: ml_collections.ConfigDict) -> None:
  """Raises SettingError naming the first field of config whose value cannot run; the
  files and folders it names are left to `Settings.of`, where the run starts."""
  # pylint: disable=import-outside-toplevel  (scores and models load JAX)
  from ntxr import models, scores
  from ntxr.encoders import bert
  for field, choices in [
      ("objective", specs.OBJECTIVES), ("strategy", specs.STRATEGIES),
      ("score", scores.SCORERS), ("size", layouts.SYNTHETIC_SIZES), ("tokens", TOKENS),
      ("text_cleaning", layouts.TEXT_CLEANINGS), ("vocabulary", VOCABULARIES),
      ("missing_word_vectors", MISSING_WORD_VECTORS), ("initializer", models.INITIALIZERS),
      ("compute_dtype", models.COMPUTE_DTYPES), ("train_padding", PADDINGS),
      ("select_by", SELECTIONS), ("similarity", ("", *SIMILARITIES)),
      ("pool_remainder", models.POOL_REMAINDERS), ("word_variants", WORD_VARIANTS),
      ("validation_draws", VALIDATION_DRAWS), ("matmul_precision", MATMUL_PRECISIONS),
      ("conv_precision", ("", *MATMUL_PRECISIONS)), ("sentence_pooling", bert.POOLINGS),
      ("audio_encoder", AUDIO_ENCODERS), ("text_encoder", TEXT_ENCODERS),
      ("frozen", FROZEN), ("lr_schedule", LR_SCHEDULES), ("negatives", NEGATIVES)]:
    _choose(field, config[field], choices)
  for field, value in _flat(config):
    if isinstance(value, float) and not math.isfinite(value):
      raise SettingError(f"--config.{field} must be a finite number, not {value}")
  for field, least in AT_LEAST.items():
    if not config[field] >= least:  # also refuses NaN
      raise SettingError(f"--config.{field} must be at least {least}, not {config[field]}")
  for field, most in AT_MOST.items():
    if config[field] > most:
      raise SettingError(f"--config.{field} must be at most {most}, not {config[field]}")
  for field, value in (("dropout", config.dropout), ("plateau.factor", config.plateau.factor)):
    if not 0 <= value < 1:
      raise SettingError(f"--config.{field} must be at least 0 and below 1, not {value}")
  for group in ("plateau", "collapse", "stopper", "warmup_cosine"):
    for field, value in config[group].items():
      if not value >= 0:
        raise SettingError(f"--config.{group}.{field} must be at least 0, not {value}")
  if config.stopper.num_results < 1:
    raise SettingError(f"--config.stopper.num_results must be at least 1, not "
                       f"{config.stopper.num_results}")
  if 0 < config.sample_rate < MIN_SAMPLE_RATE or config.sample_rate < 0:
    raise SettingError(f"--config.sample_rate must be 0 (the corpus's own) or at least "
                       f"{MIN_SAMPLE_RATE} Hz, not {config.sample_rate}")
  if config.f_max and config.f_max <= config.f_min:
    raise SettingError(f"--config.f_max ({config.f_max}) must be above --config.f_min "
                       f"({config.f_min}), or 0 for the Nyquist frequency")
  rate = config.sample_rate or (layouts.FOLDER_SAMPLE_RATE if config.data_dir
                                 else layouts.SYNTHETIC_SAMPLE_RATE)
  given = (f"--config.sample_rate={rate}" if config.sample_rate else
           f"--config.sample_rate=0: {rate} Hz, "
           + ("to which a data folder's recordings are resampled" if config.data_dir else
              "the built-in corpus's own"))
  if config.f_max > rate / 2:
    raise SettingError(f"--config.f_max ({config.f_max}) must be at most the Nyquist "
                       f"frequency, {rate / 2:g} Hz at the sample rate ({given}), or 0 for it")
  if config.f_min >= rate / 2:
    raise SettingError(f"--config.f_min ({config.f_min}) must be below the Nyquist "
                       f"frequency, {rate / 2:g} Hz at the sample rate ({given})")
  if len(config.channels) != len(models.PAPER_POOLS) or min(config.channels) < 1:
    raise SettingError(f"--config.channels must be {len(models.PAPER_POOLS)} positive "
                       f"counts, one per CRNN block, not {tuple(config.channels)}")
  stride = math.prod(pool[0] for pool in models.PAPER_POOLS if pool)
  buckets = tuple(config.frame_buckets)
  rising = bool(buckets) and list(buckets) == sorted(set(buckets))
  if config.audio_encoder != "crnn":  # frames of waveform: any length
    if not rising or buckets[0] < 1:
      raise SettingError(f"--config.frame_buckets must rise, each a count of "
                         f"{PRETRAINED_HOP}-sample frames, not {buckets}")
    if config.audio_encoder == "passt":
      _check_passt(buckets)
  elif not rising or any(b < stride or b % stride for b in buckets):
    raise SettingError(f"--config.frame_buckets must rise, each a multiple of the CRNN's "
                       f"time stride {stride}, not {buckets}")
  for field, default in (("audio_encoder", "crnn"), ("text_encoder", "word_vectors")):
    weights = field.replace("encoder", "weights")
    if config[field] != default and not config[weights]:
      raise SettingError(
          f"--config.{field}={config[field]} reads its publisher's weights: give "
          f"--config.{weights}=" + ("PATH (the .pth or .pt file)" if field == "audio_encoder"
                                    else "DIR (the Hugging Face model folder)"))
    if config[field] == default and config[weights]:
      raise SettingError(
          f"--config.{weights} names the pretrained {field.split('_')[0]} encoder's file: "
          f"give it with --config.{field}=" + ("|".join(
              AUDIO_ENCODERS[1:] if field == "audio_encoder" else TEXT_ENCODERS[1:]))
          + ", not alone")
  _check_fine_tuning(config)
  if config.text_encoder != "word_vectors" and (config.word_vectors or
                                                config.similarity == "word_vectors"):
    raise SettingError(f"--config.text_encoder={config.text_encoder} reads its own "
                       f"tokens: --config.word_vectors and --config.similarity=word_vectors "
                       f"are for the word-vector text encoder")
  if (config.require_word_vectors and not config.word_vectors
      and config.text_encoder == "word_vectors"):
    raise SettingError(
        "this config trains on frozen word2vec vectors, as the paper: pass "
        "--config.word_vectors=/path/to/GoogleNews-vectors-negative300.bin (or any "
        "word2vec-format file), or --config.require_word_vectors=false to learn a "
        "random word table instead")
  for needs, what in [(specs.OBJECTIVES[config.objective].needs_relevance,
                       f"--config.objective={config.objective}"),
                      (config.filter_similarity > 0, "--config.filter_similarity")]:
    if needs and not config.similarity:
      raise SettingError(f"{what} compares captions: set --config.similarity to one of "
                         f"{list(SIMILARITIES)}")
  if config.similarity == "word_vectors" and not config.word_vectors:
    raise SettingError("--config.similarity=word_vectors needs --config.word_vectors")


def _check_paths(config: ml_collections.ConfigDict) -> None:
  """Raises SettingError naming the first file or folder of config that is not there, or
  a --config.max_tokens the text encoder's file cannot read."""
  for field in ("word_vectors", "relevance_file"):
    if config[field] and not os.path.isfile(os.path.expanduser(config[field])):
      raise SettingError(f"--config.{field}={config[field]}: no such file")
  if config.audio_weights and not os.path.isfile(os.path.expanduser(config.audio_weights)):
    from ntxr import encoders  # pylint: disable=import-outside-toplevel  (JAX)
    found = ("a folder, not a checkpoint file" if os.path.isdir(
        os.path.expanduser(config.audio_weights)) else "no such file")
    raise SettingError(f"--config.audio_weights={config.audio_weights}: {found} "
                       f"({config.audio_encoder}'s is published at "
                       f"{encoders.PUBLISHED[config.audio_encoder]})")
  if config.text_weights and not os.path.isfile(
      os.path.join(os.path.expanduser(config.text_weights), "config.json")):
    raise SettingError(f"--config.text_weights={config.text_weights}: no Hugging Face model "
                       f"folder (config.json, model.safetensors or pytorch_model.bin, the "
                       f"tokenizer's files), as published on huggingface.co")
  if config.text_weights:
    _check_text_length(os.path.expanduser(config.text_weights), config.max_tokens)
  folder = os.path.expanduser(config.graded_relevance_dir)
  if folder and not (os.path.isdir(folder) and any(
      name.endswith("_relevances.csv") for name in os.listdir(folder))):
    raise SettingError(f"--config.graded_relevance_dir={config.graded_relevance_dir}: no "
                       f"folder of TAU ratings (SPLIT_relevances.csv, SPLIT_text.csv, "
                       f"SPLIT_audio_metadata.csv)")
  try:  # it holds the prepared data and their lock
    files.check_folder("config.cache_dir", os.path.expanduser(config.cache_dir))
  except ValueError as error:
    raise SettingError(error) from None
  if config.data_dir:
    try:
      layouts.layout_of(os.path.expanduser(config.data_dir))
    except ValueError as error:
      raise SettingError(f"--config.data_dir={error}") from None


def _check_text_length(folder: str, max_tokens: int) -> None:
  """SettingError unless a caption of max_tokens tokens fits the text encoder in `folder`:
  its two special tokens and a word, at most one token per position embedding."""
  from ntxr.encoders import bert  # pylint: disable=import-outside-toplevel  (JAX)
  try:
    most = bert.max_tokens(bert.module_from_config(bert.read_config(folder)))
  except ValueError as error:
    raise SettingError(f"--config.text_weights={error}") from None
  if not 3 <= max_tokens <= most:
    raise SettingError(f"--config.max_tokens={max_tokens}: the text encoder in {folder} "
                       f"reads 3 (its two special tokens and a word) to {most} tokens")


def _splits(config: ml_collections.ConfigDict) -> tuple:
  """(training, validation, test) split names of the config's data folder's layout (the
  built-in corpus's: Clotho's), the last two as --config.validation_split and test_split
  name them; SettingError for a name the layout lacks."""
  layout = layouts.layout_of(os.path.expanduser(config.data_dir)) if config.data_dir else "clotho"
  own = layouts.LAYOUT_SPLITS[layout]
  for field in ("validation_split", "test_split"):
    if config[field]:
      _choose(field, config[field], own)
  return own[0], config.validation_split or own[1], config.test_split or own[2]


def _flat(config: ml_collections.ConfigDict, prefix: str = "") -> list:
  """[(field, value)] of every field of config, a group's as "group.field"."""
  return [item for field, value in config.items()
          for item in (_flat(value, f"{prefix}{field}.")
                       if isinstance(value, ml_collections.ConfigDict)
                       else [(f"{prefix}{field}", value)])]


def run_name(config: ml_collections.ConfigDict) -> str:
  """The run's setting in a word (`specs.run_name`), its objective checked."""
  _choose("objective", config.objective, specs.OBJECTIVES)
  return specs.run_name(config.objective, config.strategy)


def check_together(configs: list) -> None:
  """Raises SettingError unless the configs differ only in PER_RUN fields (a path
  however it is written: `_normal`)."""
  first = configs[0].to_dict()
  if len(configs) > 1 and first["negatives"] != "gather":
    raise SettingError("runs trained together step as one program over the runs: train "
                       "them with --config.negatives=gather, or apart")
  for config in configs[1:]:
    for field, value in config.to_dict().items():
      if field not in PER_RUN and _normal(field, value) != _normal(field, first[field]):
        raise SettingError(
            f"runs trained together differ only in {', '.join(PER_RUN)}; --config.{field} "
            f"is {first[field]!r} in one and {value!r} in another")


def check(workdir: str, config: ml_collections.ConfigDict, elsewhere: str = "--workdir"
          ) -> dict:
  """Raises SettingError, writing nothing, for a config that cannot run, a workdir that
  cannot be one, or a config that differs from the run workdir holds (the error's advice:
  use another `elsewhere`); returns the config as config.json holds it."""
  try:
    files.check_folder("workdir", workdir)
  except ValueError as error:
    raise SettingError(error) from None
  Settings.of(config)
  changed = [change for change in changes(workdir, config)
             if change[0] not in RESUMABLE_CHANGES]
  if changed:
    raise SettingError(f"{workdir} holds a run with other settings ("
                       + "; ".join(f"{field}: {there!r} there, {here!r} here"
                                   for field, there, here in changed)
                       + f"); use another {elsewhere}")
  trained = trained_epochs(workdir)
  if config.num_epochs < trained:
    raise SettingError(f"{workdir} holds a run trained for {trained} epochs: "
                       f"--config.num_epochs={config.num_epochs} would report them as "
                       f"{config.num_epochs}; give at least {trained}, or use another "
                       f"{elsewhere}")
  return json.loads(config.to_json())


def _normal(field: str, value):
  """`value` of config field `field` as it compares: a path without its trailing slash."""
  if field not in PATHS or not value:
    return value
  return (value.rstrip("/") if files.is_bucket(value)
          else os.path.normpath(os.path.expanduser(value)))


def changes(workdir: str, config: ml_collections.ConfigDict) -> list:
  """The fields of `config` whose value differs from the run workdir holds, as (field,
  value there, value here) in field order; [] where workdir holds no run, or only the
  settings of one that stopped before it saved anything (no checkpoint, epoch or
  results: a setting that failed at once can be mended)."""
  previous = saved(workdir)
  if previous is None or not (
      any(name.isdigit() for which in ("latest", "best")
          for name in files.names(os.path.join(workdir, "checkpoints", which)))
      or trained_epochs(workdir) or files.exists(os.path.join(workdir, "results.json"))):
    return []
  current = json.loads(config.to_json())
  return [(k, previous.get(k), current.get(k)) for k in sorted(set(current) | set(previous))
          if _normal(k, current.get(k)) != _normal(k, previous.get(k))]


def trained_epochs(workdir: str) -> int:
  """How many epochs the run in workdir has trained: its metrics log's last epoch."""
  lines = files.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
  return max((line.get("epoch", 0) for line in lines), default=0)


def write(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes config.json (the first process) once `check` passes. Training calls it once
  its data is read, so a run that fails before leaves no settings behind."""
  import jax  # pylint: disable=import-outside-toplevel
  current = check(workdir, config)
  files.makedirs(workdir)
  if jax.process_index() == 0:
    files.write_json(os.path.join(workdir, "config.json"), current)


def saved(workdir: str) -> Optional[dict]:
  """The config of workdir's run (None if it holds none), with the fields ntxr gained
  since config.json was written at their defaults, so an older run still resumes."""
  from ntxr.configs import default  # pylint: disable=import-outside-toplevel
  path = os.path.join(workdir, "config.json")
  if not files.exists(path):
    return None
  return {**json.loads(default.get_config().to_json()), **json.loads(files.read_text(path))}
