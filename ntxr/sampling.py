"""Negative sampling strategies and the bidirectional triplet loss (JAX and NumPy only).

In a batch of N pairs (audio_i, text_i), `audio_ids[i]` names the clip. The pool of
anchor i is every j with audio_ids[j] != audio_ids[i]: a clip's other captions are
never negatives. With s_cross[a, t] = score(audio a, text t) and S_ii its diagonal,
text anchor i gets an audio negative scored s_cross[j, i], and audio anchor i a text
negative scored s_cross[i, j]. The loss is

  (1/N) sum_i [relu(S_ai - S_ii + m) + relu(S_it - S_ii + m)],

and an anchor with an empty pool contributes 0. Negatives are chosen without
gradient (indices only, ties to the lowest index); gradients flow through the
selected scores. Reference: Xie, Rasanen, Virtanen, "On Negative Sampling for
Contrastive Audio-Text Retrieval", ICASSP 2023.

Strategies live in the registry `STRATEGIES`; a new one is one decorated function.
"""

import dataclasses
from typing import Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from ntxr import scores

Array = jax.Array

# (selection matrix [N, N] or None, pool [N, N] bool, key) -> (audio_neg, text_neg).
Selector = Callable[[Optional[Array], Array, Optional[Array]], tuple[Array, Array]]


@dataclasses.dataclass(frozen=True)
class Strategy:
  """A way of choosing negatives.

  Attributes:
    name: registry name.
    needs: the score matrix selection reads: "cross", "audio", "text" or None.
    select: the selector, or None for full_batch (every pool member is a negative).
    needs_key: whether selection draws random numbers.
  """
  name: str
  needs: Optional[str]
  select: Optional[Selector]
  needs_key: bool = False


STRATEGIES: dict[str, Strategy] = {}


def register(name: str, needs: Optional[str], needs_key: bool = False):
  """Decorator adding a selector to STRATEGIES under `name`."""
  def decorate(select: Selector) -> Selector:
    if name in STRATEGIES:
      raise ValueError(f"a strategy named {name!r} is registered already")
    STRATEGIES[name] = Strategy(name, needs, select, needs_key)
    return select
  return decorate


STRATEGIES["full_batch"] = Strategy("full_batch", "cross", None)


def masked_argmax(values: Array, pool: Array) -> Array:
  """Row-wise argmax over the pool: [N, N], [N, N] bool -> [N] int32, -1 if pool empty.

  Ties go to the lowest index.
  """
  index = jnp.argmax(jnp.where(pool, values, -jnp.inf), axis=1).astype(jnp.int32)
  return jnp.where(pool.any(axis=1), index, -1)


@register("random", needs=None, needs_key=True)
def _random(_, pool, key):
  """Uniform over the pool, audio and text drawn independently."""
  audio_key, text_key = jax.random.split(key)
  return (masked_argmax(jax.random.uniform(audio_key, pool.shape), pool),
          masked_argmax(jax.random.uniform(text_key, pool.shape), pool))


@register("semihard_cross", needs="cross")
def _semihard_cross(s_cross, pool, _):
  """Negative whose cross score is closest to the positive's, either side."""
  positive = jnp.diagonal(s_cross)[:, None]
  return (masked_argmax(-jnp.abs(s_cross.T - positive), pool),
          masked_argmax(-jnp.abs(s_cross - positive), pool))


@register("hard_cross", needs="cross")
def _hard_cross(s_cross, pool, _):
  """Negative with the highest cross score."""
  return masked_argmax(s_cross.T, pool), masked_argmax(s_cross, pool)


def _same_for_both(sign: float) -> Selector:
  """Selector taking one j per anchor from a within-modality matrix, used both ways."""
  def select(s_within, pool, _):
    index = masked_argmax(sign * s_within, pool)
    return index, index
  return select


register("easy_text", needs="text")(_same_for_both(-1.0))
register("hard_text", needs="text")(_same_for_both(1.0))
register("easy_audio", needs="audio")(_same_for_both(-1.0))
register("hard_audio", needs="audio")(_same_for_both(1.0))


def get_strategy(name: str) -> Strategy:
  """The registered strategy called `name`; ValueError listing the names otherwise."""
  if name not in STRATEGIES:
    raise ValueError(f"unknown strategy {name!r}; choose from {sorted(STRATEGIES)}")
  return STRATEGIES[name]


def _check_ids(audio_ids: Array) -> int:
  """Validates audio_ids [N] integer; returns N."""
  if audio_ids.ndim != 1 or not jnp.issubdtype(audio_ids.dtype, jnp.integer):
    raise ValueError(
        f"audio_ids must be an integer vector [N], got {audio_ids.dtype} {audio_ids.shape}")
  return audio_ids.shape[0]


def _check_matrix(name: str, matrix: Optional[Array], n: int, required: bool) -> None:
  """Validates a score matrix as float [n, n]; `required` says None is an error."""
  if matrix is None:
    if required:
      raise ValueError(f"this strategy needs {name}, an [N, N] score matrix")
    return
  if matrix.shape != (n, n):
    raise ValueError(f"{name} must have shape {(n, n)}, got {matrix.shape}")
  if not jnp.issubdtype(matrix.dtype, jnp.floating):
    raise ValueError(f"{name} must be floating point, got {matrix.dtype}")


def _check_key(strategy: Strategy, key: Optional[Array]) -> None:
  if strategy.needs_key and key is None:
    raise ValueError(f"strategy {strategy.name!r} draws at random: pass key=")


def negative_pool(audio_ids: Array) -> Array:
  """pool[i, j] = audio_ids[i] != audio_ids[j]: [N] -> [N, N] bool."""
  return audio_ids[:, None] != audio_ids[None, :]


def select_negatives(s_cross: Optional[Array], audio_ids: Array, *, strategy: str,
                     key: Optional[Array] = None, s_audio: Optional[Array] = None,
                     s_text: Optional[Array] = None) -> tuple[Array, Array]:
  """Indices of one audio negative per text anchor and one text negative per audio anchor.

  Args:
    s_cross: [N, N] float, s_cross[a, t] = score(audio a, text t); may be None for
      strategies that do not read it.
    audio_ids: [N] int, equal exactly when two captions belong to the same clip.
    strategy: a single-negative name in STRATEGIES (not full_batch).
    key: PRNG key, required by "random".
    s_audio: [N, N] float audio-audio scores, for easy_audio / hard_audio.
    s_text: [N, N] float text-text scores, for easy_text / hard_text.

  Returns:
    (audio_neg [N] int32, text_neg [N] int32); -1 where the pool is empty.

  Example:
    >>> s = jnp.array([[.9, .2, .4], [.1, .8, .3], [.5, .6, .7]])
    >>> select_negatives(s, jnp.array([0, 1, 2]), strategy="hard_cross")
    (Array([2, 2, 0], dtype=int32), Array([2, 2, 1], dtype=int32))
  """
  spec = get_strategy(strategy)
  if spec.select is None:
    raise ValueError(f"{strategy!r} uses every pool member; it selects no single negative")
  n = _check_ids(audio_ids)
  matrices = {"cross": s_cross, "audio": s_audio, "text": s_text}
  for name, matrix in matrices.items():
    _check_matrix(f"s_{name}", matrix, n, required=spec.needs == name)
  _check_key(spec, key)
  within = matrices.get(spec.needs)
  return spec.select(None if within is None else jax.lax.stop_gradient(within),
                     negative_pool(audio_ids), key)


def _hinge_mean(negative: Array, positive: Array, margin: float, valid: Array) -> Array:
  """Mean over anchors of relu(negative - positive + margin), 0 where not valid.

  negative and positive are [N, 2]-broadcastable: one column per direction.
  """
  hinge = jax.nn.relu(negative - positive + margin).sum(axis=-1)
  return jnp.mean(jnp.where(valid, hinge, 0.0))


def _full_batch_loss(s_cross: Array, pool: Array, margin: float) -> Array:
  """Hinge averaged over each anchor's whole pool, both directions; [N, N] -> scalar."""
  positive = jnp.diagonal(s_cross)[:, None]
  count = jnp.maximum(pool.sum(axis=1), 1)
  hinge = (jnp.where(pool, jax.nn.relu(s_cross.T - positive + margin), 0.0)
           + jnp.where(pool, jax.nn.relu(s_cross - positive + margin), 0.0))
  return jnp.mean(hinge.sum(axis=1) / count)


def triplet_loss(s_cross: Array, audio_ids: Array, *, strategy: str,
                 margin: float = 0.5, key: Optional[Array] = None,
                 s_audio: Optional[Array] = None,
                 s_text: Optional[Array] = None) -> Array:
  """The paper's bidirectional triplet loss from a cross score matrix.

  Args:
    s_cross: [N, N] float, s_cross[a, t] = score(audio a, text t); differentiable.
    audio_ids: [N] int clip ids.
    strategy: a name in STRATEGIES.
    margin: hinge margin m.
    key: PRNG key, required by "random".
    s_audio, s_text: [N, N] within-modality scores for the audio / text strategies
      (selection only: no gradient flows through them).

  Returns:
    Scalar loss in s_cross's dtype; anchors with an empty pool add 0.

  Example:
    >>> s = jnp.array([[.6, .5], [.3, .7]])
    >>> round(float(triplet_loss(s, jnp.array([0, 1]), strategy="hard_cross")), 4)
    0.5
  """
  spec = get_strategy(strategy)
  n = _check_ids(audio_ids)
  _check_matrix("s_cross", s_cross, n, required=True)
  pool = negative_pool(audio_ids)
  if spec.select is None:
    return _full_batch_loss(s_cross, pool, margin)
  audio_neg, text_neg = select_negatives(s_cross, audio_ids, strategy=strategy, key=key,
                                         s_audio=s_audio, s_text=s_text)
  anchors = jnp.arange(n)
  negative = jnp.stack([s_cross[audio_neg, anchors], s_cross[anchors, text_neg]], axis=1)
  positive = jnp.diagonal(s_cross)[:, None]
  return _hinge_mean(negative, positive, margin, audio_neg >= 0)


class TripletTerms(NamedTuple):
  """What the loss saw, for diagnostics: positive [N]; negative [N, 2] (audio
  negative, text negative; full_batch: the mean over the pool); valid [N] (non-empty pool)."""
  positive: Array
  negative: Array
  valid: Array


def triplet_loss_from_embeddings(audio: Array, text: Array, audio_ids: Array, *,
                                 strategy: str, margin: float = 0.5,
                                 key: Optional[Array] = None,
                                 audio_mask: Optional[Array] = None,
                                 text_mask: Optional[Array] = None,
                                 score: str = "alignment") -> Array:
  """The scalar loss of `triplet_loss_and_terms` (same arguments)."""
  return triplet_loss_and_terms(audio, text, audio_ids, strategy=strategy, margin=margin,
                                key=key, audio_mask=audio_mask, text_mask=text_mask,
                                score=score)[0]


def triplet_loss_and_terms(audio: Array, text: Array, audio_ids: Array, *,
                           strategy: str, margin: float = 0.5,
                           key: Optional[Array] = None,
                           audio_mask: Optional[Array] = None,
                           text_mask: Optional[Array] = None,
                           score: str = "alignment") -> Tuple[Array, TripletTerms]:
  """The triplet loss from embeddings, computing only what the strategy needs.

  Negatives are chosen without gradient from the one matrix the strategy reads (the
  N x N cross matrix for the cross strategies, a symmetric within-modality matrix for
  the audio and text ones, none for random); then only the 3N selected pairs
  (positive, audio negative, text negative) are scored with gradient, the audio
  tensor gathered once. full_batch
  builds the cross matrix with gradient. Equals `triplet_loss` on full matrices.

  Args:
    audio: [N, T, E] float frame embeddings; text: [N, W, E] float word embeddings.
    audio_ids: [N] int clip ids.
    strategy: a name in STRATEGIES; margin: hinge margin; key: PRNG key for "random".
    audio_mask: [N, T] bool; text_mask: [N, W] bool (None: all valid).
    score: "alignment" (the paper's) or "pooled".

  Returns:
    (scalar loss, TripletTerms).
  """
  spec = get_strategy(strategy)
  scorer = scores.get_scorer(score)
  n = _check_ids(audio_ids)
  if audio.ndim != 3 or text.ndim != 3 or audio.shape[0] != n or text.shape[0] != n:
    raise ValueError(f"audio [N, T, E] and text [N, W, E] must match audio_ids [{n}]; "
                     f"got {audio.shape} and {text.shape}")
  _check_key(spec, key)
  if spec.select is None:
    s_cross = scorer.matrix(audio, text, audio_mask, text_mask)
    pool = negative_pool(audio_ids)
    count = jnp.maximum(pool.sum(axis=1), 1)
    pool_mean = lambda s: jnp.where(pool, s, 0).sum(axis=1) / count
    terms = TripletTerms(jnp.diagonal(s_cross),
                         jnp.stack([pool_mean(s_cross.T), pool_mean(s_cross)], axis=1),
                         pool.any(axis=1))
    return _full_batch_loss(s_cross, pool, margin), terms

  frozen_audio, frozen_text = jax.lax.stop_gradient((audio, text))
  selection_matrix = {
      None: lambda: None,
      "cross": lambda: scorer.matrix(frozen_audio, frozen_text, audio_mask, text_mask),
      "audio": lambda: scorer.symmetric(frozen_audio, audio_mask),
      "text": lambda: scorer.symmetric(frozen_text, text_mask),
  }[spec.needs]()
  audio_neg, text_neg = spec.select(selection_matrix, negative_pool(audio_ids), key)

  # Each audio scores its own caption and its text negative in one [T, 2W] product;
  # only the audio negatives need the (large) audio tensor gathered.
  take = lambda x, rows: None if x is None else x[rows]
  own_and_negative = lambda x: None if x is None else jnp.stack([x, x[text_neg]], axis=1)
  positive, text_negative = scorer.paired(
      audio, own_and_negative(text), audio_mask, own_and_negative(text_mask)).T
  audio_negative = scorer.paired(audio[audio_neg], text, take(audio_mask, audio_neg),
                                 text_mask)
  terms = TripletTerms(positive, jnp.stack([audio_negative, text_negative], axis=1),
                       audio_neg >= 0)
  return _hinge_mean(terms.negative, positive[:, None], margin, terms.valid), terms
