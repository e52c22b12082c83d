"""The train state, the optimizer and the pure steps of one batch (no data code here).

`train_step` and `eval_loss` are pure functions of (state, batch, key); the trainer
(ntxr.train) and the benchmark (ntxr.bench) jit them. This module imports no
TensorFlow, so the benchmark runs where only JAX is installed.
"""

import dataclasses
import functools
from typing import Any, Optional

import flax
from flax import traverse_util
from flax.training import train_state
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ntxr import false_negatives, memory as memory_lib, models, objectives, ring, sampling
from ntxr import scores, settings


class TrainState(train_state.TrainState):
  """params: the model's, and under "objective" the objective's learnt scalars (siglip's
  log inverse temperature and bias), if it has any."""
  batch_stats: Any

  def variables(self, params=None) -> dict:
    """The model's variables, with `params` in place of the state's if given."""
    params = self.params if params is None else params
    return {"params": {k: v for k, v in params.items() if k != "objective"},
            "batch_stats": self.batch_stats}


class TrainStateWithMemory(TrainState):
  """A TrainState with a cross-batch memory (`ntxr.memory`). A run without one keeps
  TrainState's fields, the tree its checkpoints have always held."""
  memory: memory_lib.Memory


def with_memory(state: TrainState, memory: memory_lib.Memory) -> TrainStateWithMemory:
  """The state with a cross-batch memory."""
  return TrainStateWithMemory(**{field.name: getattr(state, field.name)
                                 for field in dataclasses.fields(state)}, memory=memory)


def memory_of(state: TrainState) -> Optional[memory_lib.Memory]:
  """The state's cross-batch memory, or None."""
  return state.memory if isinstance(state, TrainStateWithMemory) else None


BATCH_NORM_PASS_FRAMES = 500  # the authors' CRNNEncoder's pass: torch.randn(1, 1, 500, mels)
WORD_TABLE = ("text", "embed")  # the parameters of the paper's frozen word vectors
PRETRAINED = ("audio_encoder", "text_encoder")  # a pretrained encoder's (models.DualEncoder)


@dataclasses.dataclass(frozen=True)
class Updates:
  """How the optimizer updates the parameters beyond Adam at the learning rate.

  frozen: paths of parameters never updated (WORD_TABLE, or a name in PRETRAINED);
  encoder_lr_factor: the pretrained encoders' learning rate is the rate times this;
  weight_decay: above 0, AdamW's decoupled decay; warmup_cosine: (warmup steps, decay
  steps, lowest rate) of a per-step schedule to the learning rate and back
  (`warmup_cosine`), or None: the rate the training loop sets (`set_learning_rate`).
  """
  frozen: tuple = ()
  encoder_lr_factor: float = 1.0
  weight_decay: float = 0.0
  warmup_cosine: Optional[tuple] = None


def warmup_cosine(step, *, peak: float, warmup: int, decay: int, lowest: float):
  """The learning rate at optimizer step `step` (the DCASE 2025 baseline's schedule): from
  lowest linearly to peak over `warmup` steps, back to lowest along half a cosine over
  `decay` steps, then lowest.

  >>> [round(float(warmup_cosine(s, peak=1.0, warmup=2, decay=2, lowest=0.0)), 3)
  ...  for s in range(6)]
  [0.0, 0.5, 1.0, 0.5, 0.0, 0.0]
  """
  step = jnp.asarray(step, jnp.float32)
  rising = lowest + (peak - lowest) * step / max(warmup, 1)
  progress = jnp.clip((step - warmup) / max(decay, 1), 0.0, 1.0)
  falling = lowest + (peak - lowest) * 0.5 * (1 + jnp.cos(jnp.pi * progress))
  return jnp.where(step < warmup, rising, falling)


def make_optimizer(learning_rate, updates: Updates) -> optax.GradientTransformation:
  """Adam (AdamW with weight decay) at learning_rate, as `updates` says."""
  def adam(rate):
    return (optax.adamw(rate, weight_decay=updates.weight_decay) if updates.weight_decay
            else optax.adam(rate))

  def label(path, _):
    if any(path[:len(frozen)] == frozen for frozen in updates.frozen):
      return "frozen"
    return "encoder" if path[0] in PRETRAINED and updates.encoder_lr_factor != 1 else "train"

  transforms = {"train": adam(learning_rate), "frozen": optax.set_to_zero(),
                "encoder": adam(learning_rate * updates.encoder_lr_factor)}
  used = ["train"] + ["frozen"] * bool(updates.frozen) + ["encoder"] * (
      updates.encoder_lr_factor != 1)
  if used == ["train"]:
    return transforms["train"]
  return optax.multi_transform({name: transforms[name] for name in used},
                               lambda params: traverse_util.path_aware_map(label, params))


@functools.lru_cache(maxsize=None)
def optimizer(learning_rate: float, updates: Updates) -> optax.GradientTransformation:
  """`make_optimizer` with the learning rate in its state: the plateau's, which
  set_learning_rate changes, or the schedule's of each step. One object per setting: a
  train state's optimizer is part of its static structure, so states of one setting
  must share it to share compiled steps."""
  rate = learning_rate
  if updates.warmup_cosine is not None:
    warmup, decay, lowest = updates.warmup_cosine
    rate = functools.partial(warmup_cosine, peak=learning_rate, warmup=warmup, decay=decay,
                             lowest=lowest)
  return optax.inject_hyperparams(make_optimizer, static_args="updates")(
      learning_rate=rate, updates=updates)


@functools.partial(jax.jit, static_argnames="model")
def _init_variables(model: models.DualEncoder, key: jax.Array, example: dict,
                    pretrained: dict) -> dict:
  """The model's initial variables, the pretrained encoders' ("audio_encoder",
  "text_encoder" of `models.DualEncoder`) copied from their files' {name: {"params": ...,
  ...}}: the random values they replace are never computed. Compiled once per model
  setting (modules hash by field); ValueError where a file's shapes differ."""
  variables = {collection: dict(tree)
               for collection, tree in model.init(key, example, train=False).items()}
  shapes = lambda tree: jax.tree.map(jnp.shape, tree)
  for name, loaded in pretrained.items():
    for collection, tree in loaded.items():
      if shapes(variables[collection][name]) != shapes(tree):
        raise ValueError(f"the {name}'s {collection} in its file do not fit the module "
                         f"built from it")
      variables[collection][name] = jax.tree.map(jnp.copy, tree)  # a copy: steps donate it
  return variables


def create_train_state(model: models.DualEncoder, key: jax.Array, *, frames: int, words: int,
                       mel_bands: int, objective: str = "triplet", learning_rate: float = 1e-3,
                       word_table: Optional[np.ndarray] = None,
                       pretrained: Optional[dict] = None,
                       updates: Updates = Updates(), batch_norm_pass: bool = False
                       ) -> TrainState:
  """Initialised parameters (from an example of `frames` frames of `mel_bands` values
  (log-mel bands, or waveform samples) and `words` tokens) and Adam; the objective's
  learnt scalars join the params; word_table [V, E] replaces (and freezes) the text
  encoder's table; pretrained {"audio_encoder" or "text_encoder": variables} replace the
  pretrained encoders' initial variables; updates: the optimizer's (`Updates`).
  batch_norm_pass: the audio encoder then runs once in training mode on a random normal
  clip of BATCH_NORM_PASS_FRAMES frames, moving its BatchNorm statistics, as the authors'
  encoder does when it is built (to measure its GRU's input)."""
  example = dict(audio=jnp.zeros((2, frames, mel_bands)), audio_mask=jnp.ones((2, frames), bool),
                 tokens=jnp.ones((2, words), jnp.int32), token_mask=jnp.ones((2, words), bool))
  variables = _init_variables(model, key, example, pretrained or {})
  if batch_norm_pass:
    clip = jax.random.normal(jax.random.fold_in(key, 1), (1, BATCH_NORM_PASS_FRAMES, mel_bands))
    _, moved = model.apply(variables, clip, jnp.ones(clip.shape[:2], bool), train=True,
                           method="embed_audio", mutable=["batch_stats"],
                           rngs={"dropout": jax.random.fold_in(key, 2)})
    variables = {**variables, **moved}
  params = variables["params"]
  if word_table is not None:
    expected = params["text"]["embed"]["embedding"].shape
    if word_table.shape != expected:
      raise ValueError(f"word vectors are {word_table.shape}, the text encoder needs "
                       f"{expected}: set --config.embed_dim={word_table.shape[1]}")
    params = {**params, "text": {"embed": {"embedding": jnp.asarray(word_table)}}}
  params = {**params, **objectives.initial_parameters(objective)}
  state = TrainState.create(apply_fn=model.apply, params=params,
                            tx=optimizer(learning_rate, dataclasses.replace(
                                updates, frozen=updates.frozen + (WORD_TABLE,) * (
                                    word_table is not None))),
                            batch_stats=variables.get("batch_stats", {}))
  # Strongly typed leaves, as train_step returns them: the step compiles once, not twice.
  return jax.tree.map(lambda x: jnp.asarray(x, dtype=jnp.asarray(x).dtype), state)


def scheduled(state: TrainState) -> bool:
  """Whether the state's optimizer sets its own learning rate each step (warmup_cosine)."""
  return bool(state.opt_state.hyperparams_states)


def set_learning_rate(state: TrainState, learning_rate: float) -> TrainState:
  """The state with its optimizer's learning rate set, placed as the old one was
  (replicated over every process's devices in training); unchanged where the optimizer
  schedules its own (`scheduled`)."""
  if scheduled(state):
    return state
  old = state.opt_state.hyperparams["learning_rate"]
  hyperparams = dict(state.opt_state.hyperparams,
                     learning_rate=jax.device_put(np.float32(learning_rate), old.sharding))
  return state.replace(opt_state=state.opt_state._replace(hyperparams=hyperparams))


@flax.struct.dataclass
class TrainingStatistics:
  """One training step's loss, gradient norm and what its triplets looked like: the
  share of triplets at zero loss and at exactly the margin (negative scored as the
  positive), and the positive and negative scores' mean and spread (valid anchors,
  both directions). Scalars; `mean` averages a stack of steps."""
  loss: jax.Array
  grad_norm: jax.Array
  share_zero_loss: jax.Array
  share_at_margin: jax.Array
  positive_mean: jax.Array
  positive_std: jax.Array
  negative_mean: jax.Array
  negative_std: jax.Array
  # Measured where the batch knows its clips' events (false_negatives.measured_shares).
  false_negative_share: Optional[jax.Array] = None
  filtered_share: Optional[jax.Array] = None
  filtered_false_share: Optional[jax.Array] = None

  @classmethod
  def of(cls, loss: jax.Array, grad_norm: jax.Array, terms: sampling.LossTerms,
         margin: float, shares: Optional[dict] = None) -> "TrainingStatistics":
    valid = terms.valid[:, None]
    gap = terms.negative - terms.positive[:, None]
    mean = lambda x: sampling.masked_mean(x, valid)
    positive_mean = sampling.masked_mean(terms.positive, terms.valid)
    negative_mean = mean(terms.negative)
    return cls(loss=loss, grad_norm=grad_norm, share_zero_loss=mean(gap + margin <= 0),
               share_at_margin=mean(jnp.abs(gap) <= 1e-6), positive_mean=positive_mean,
               positive_std=jnp.sqrt(sampling.masked_mean(
                   jnp.square(terms.positive - positive_mean), terms.valid)),
               negative_mean=negative_mean,
               negative_std=jnp.sqrt(mean(jnp.square(terms.negative - negative_mean))),
               **(shares or {}))

  def to_dict(self) -> dict:
    """{field: float} of the fields measured."""
    return {field.name: float(getattr(self, field.name)) for field in dataclasses.fields(self)
            if getattr(self, field.name) is not None}


class UnreadStatistics:
  """The TrainingStatistics of the steps run since the last read, left on the devices:
  reading a step's statistics waits for the step, so reading every k steps, in one
  transfer, lets the host queue the next steps meanwhile."""

  def __init__(self):
    self._steps, self._statistics = [], []

  def __len__(self) -> int:
    return len(self._steps)

  def add(self, step: int, statistics: TrainingStatistics) -> None:
    self._steps.append(step)
    self._statistics.append(statistics)

  def read(self) -> list:
    """[(step, {field: float})] of the unread steps in order, fetched at once; then empty."""
    read = list(zip(self._steps, (s.to_dict() for s in jax.device_get(self._statistics))))
    self._steps, self._statistics = [], []
    return read

  def read_runs(self, count: int) -> list:
    """For the statistics of `count` runs stepped together ([R] each, `ntxr.together`):
    per run, [(step, {field: float})] of the unread steps in order; then empty."""
    fetched = jax.device_get(self._statistics)
    read = [[(step, jax.tree.map(lambda x, r=r: x[r], statistics).to_dict())
             for step, statistics in zip(self._steps, fetched)] for r in range(count)]
    self._steps, self._statistics = [], []
    return read


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
    raise ValueError(f"padding must be one of {settings.PADDINGS}, not {padding!r}")
  audio_mask = _to_longest(batch["audio_mask"])
  return audio_mask, audio_mask, _to_longest(batch["token_mask"])


def _loss_and_terms(params: dict, variables: dict, apply_fn, batch: dict, key: jax.Array, *,
                    train: bool, loss: settings.Loss, mesh=None, memory=None):
  """(loss, (new batch_stats or None, LossTerms, false-negative shares or None, the
  batch's Embedded)) of one batch; params: the state's (for the objective's learnt
  scalars), variables: the model's. Optional batch entries: caption_similarity [B, B]
  (the filter's and soft's), events [B, K] bool (to measure false negatives),
  caption_vectors [B, D] (to compare captions with a memory's). mesh: the devices'
  (`parallel`), which loss.negatives "ring" splits the loss over; memory: a cross-batch
  memory whose entries join the pools."""
  dropout_key, sample_key = jax.random.split(key)
  encoder_mask, audio_mask, text_mask = training_masks(batch, loss.padding)
  inputs = dict(batch, audio_mask=encoder_mask)
  if train:
    (audio, text), updates = apply_fn(variables, inputs, train=True, mutable=["batch_stats"],
                                      rngs={"dropout": dropout_key,  # PaSST's patchout too
                                            "patchout": jax.random.fold_in(dropout_key, 1)})
  else:
    (audio, text), updates = apply_fn(variables, inputs, train=False), {}
  embedded = objectives.Embedded(audio, text, audio_mask, text_mask, batch["audio_id"])
  value, terms, shares = embedded_loss_and_terms(
      embedded, loss, learnt=params.get("objective", {}), key=sample_key,
      similarity=batch.get("caption_similarity"), events=batch.get("events"), mesh=mesh,
      memory=memory, caption_vectors=batch.get("caption_vectors"))
  return value, (updates.get("batch_stats"), terms, shares, embedded)


def embedded_loss_and_terms(embedded: objectives.Embedded, loss: settings.Loss, *,
                            learnt: dict, key: jax.Array, similarity=None, events=None,
                            mesh=None, memory: Optional[memory_lib.Memory] = None,
                            caption_vectors=None) -> tuple:
  """(loss, LossTerms, false-negative shares or None) of a batch's embeddings, over the
  whole batch or, with loss.negatives "ring", from each of `mesh`'s devices' rows
  (`ntxr.ring`; its LossTerms [B] without weights). learnt: the objective's parameters;
  similarity [B, B]: the captions' (the filter's and soft's); events [B, K] bool: the
  clips' event kinds (to measure false negatives); memory: a cross-batch memory, whose
  entries join every anchor's candidates after the batch's (the loss then on rows,
  `ntxr.ring`); caption_vectors [B, D]: the captions' unit vectors, which the memory's
  are compared with."""
  if loss.negatives == "ring" and mesh is None:
    raise ValueError("--config.negatives=ring splits the loss over the devices' mesh: "
                     "pass mesh=")
  if loss.negatives == "ring" or memory is not None:
    return ring.rows_loss_and_terms(
        embedded, loss, learnt=learnt, key=key, mesh=mesh if loss.negatives == "ring" else None,
        similarity=similarity, events=events, memory=memory, caption_vectors=caption_vectors)
  pool = sampling.negative_pool(embedded.audio_ids)
  kept = pool
  if loss.filters:
    s_cross = None
    if loss.filter_share_of_positive:
      s_cross = scores.get_scorer(loss.score).matrix(
          *jax.lax.stop_gradient((embedded.audio, embedded.text)), embedded.audio_mask,
          embedded.text_mask)
    kept = false_negatives.filter_pool(
        pool, s_cross, similarity, max_similarity=loss.filter_similarity,
        max_share_of_positive=loss.filter_share_of_positive)
  objective = objectives.get_objective(loss.objective)
  relevance = None
  if objective.needs_relevance:
    relevance = false_negatives.relevance(similarity, ~pool, loss.relevance_slope,
                                          loss.relevance_offset)
  value, terms = objective.loss_and_terms(embedded, loss, pool=kept, relevance=relevance,
                                          learnt=learnt, key=key)
  shares = None
  if events is not None:
    shares = false_negatives.measured_shares(
        terms.weights, pool, kept, false_negatives.same_events(events) & pool)
  return value, terms, shares


def train_step(state: TrainState, batch: dict, key: jax.Array, *,
               loss: settings.Loss = settings.Loss(), mesh=None):
  """One optimizer step: (state, batch, key) -> (state, TrainingStatistics). Jit it with
  donate_argnums=0.

  batch: {audio [B,T,F], audio_mask [B,T], tokens [B,W], token_mask [B,W], audio_id [B]},
  and optionally caption_similarity [B, B] and events [B, K] (see _loss_and_terms);
  mesh: the devices', for loss.negatives "ring". A state with a memory draws negatives
  from it too (with the batch's caption_vectors [B, D] where it keeps them), then writes
  the batch's embeddings into it.
  """
  def loss_fn(params):
    return _loss_and_terms(params, state.variables(params), state.apply_fn, batch, key,
                           train=True, loss=loss, mesh=mesh, memory=memory_of(state))
  (value, (batch_stats, terms, shares, embedded)), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  if memory_of(state) is not None:
    state = state.replace(memory=memory_lib.push(state.memory, embedded, batch.get("events"),
                                                 batch.get("caption_vectors")))
  return state, TrainingStatistics.of(value, optax.tree.norm(grads), terms, loss.margin,
                                      shares)


def eval_loss(state: TrainState, batch: dict, key: jax.Array, *,
              loss: settings.Loss = settings.Loss(), mesh=None) -> jax.Array:
  """The loss of one batch in inference mode (no dropout, running BatchNorm), its
  negatives from the batch only (a memory holds training batches)."""
  return _loss_and_terms(state.params, state.variables(), state.apply_fn, batch, key,
                         train=False, loss=loss, mesh=mesh)[0]
