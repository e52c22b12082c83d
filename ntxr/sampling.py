"""Negative sampling strategies and the bidirectional triplet loss (JAX and NumPy only).

In a batch of N pairs (audio_i, text_i), `audio_ids[i]` names the clip. The pool of
anchor i is every j with audio_ids[j] != audio_ids[i]: a clip's other captions are
never negatives. With s_cross[a, t] = score(audio a, text t) and S_ii its diagonal,
text anchor i gets an audio negative scored s_cross[j, i], and audio anchor i a text
negative scored s_cross[i, j]. The loss is

  (1/N) sum_i [relu(S_ai - S_ii + m) + relu(S_it - S_ii + m)],

full_batch averaging each anchor's hinges over its whole pool instead, and an anchor with an empty pool contributes 0. Negatives are chosen without
gradient (indices only, ties to the lowest index); gradients flow through the
selected scores. Reference: Xie, Rasanen, Virtanen, "On Negative Sampling for
Contrastive Audio-Text Retrieval", ICASSP 2023.

Strategies live in the registry `STRATEGIES`, each specified in `ntxr.specs` (its name,
the matrix it reads); a new one is one decorated function.
"""

import dataclasses
from typing import Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

from ntxr import scores, specs

Array = jax.Array


class Negatives(NamedTuple):
  """Each anchor's chosen negatives, K per anchor (K = 1 for all but full_batch).

  audio [N, K] int32: the clips scored against text anchor i; text [N, K] int32: the
  captions scored against audio anchor i; valid [N, K] bool: which entries are real
  (an anchor with an empty pool has none).
  """
  audio: Array
  text: Array
  valid: Array


def _one_each(audio_neg: Array, text_neg: Array) -> Negatives:
  """Negatives from one index per anchor and direction ([n], -1 where the pool is empty)."""
  return Negatives(audio_neg[:, None], text_neg[:, None], (audio_neg >= 0)[:, None])


class Rows(NamedTuple):
  """The anchors' rows of the matrix a strategy reads, over the G candidates (the batch's,
  then a cross-batch memory's, if any: `ntxr.memory`).

  by_audio [n, G]: audio anchor a's scores of the captions (s_cross[a, :]); by_text [n, G]:
  caption anchor t's of the clips (s_cross[:, t]); positive [n]: s_cross[i, i] (None for
  a within-modality matrix, whose one row serves both directions); anchors [n] int32:
  the anchors' indices among the G. On one batch n = G and the rows are the whole matrix
  and its transpose; over a sharded batch (`ntxr.ring`) a device holds its anchors' rows.
  """
  by_audio: Optional[Array]
  by_text: Optional[Array]
  positive: Optional[Array]
  anchors: Array


# (Rows, pool [n, G] bool, key or None) -> Negatives: caption anchors' clips (audio) and
# audio anchors' captions (text), as indices among the G.
Selector = Callable[[Rows, Array, Optional[Array]], Negatives]


@dataclasses.dataclass(frozen=True)
class Strategy:
  """A registered way of choosing negatives: its spec (name, the matrix it reads, whether
  it draws at random) and its selector."""
  spec: specs.Strategy
  select: Selector

  @property
  def needs(self) -> Optional[str]:
    """The score matrix selection reads: "cross", "audio", "text" or None."""
    return self.spec.needs

  @property
  def needs_key(self) -> bool:
    return self.spec.needs_key


STRATEGIES: dict[str, Strategy] = {}


def _selects(spec: specs.Strategy):
  """Decorator adding a selector to STRATEGIES as the strategy `spec`; once a name."""
  def decorate(select: Selector) -> Selector:
    if spec.name in STRATEGIES:
      raise ValueError(f"a strategy named {spec.name!r} is registered already")
    STRATEGIES[spec.name] = Strategy(spec, select)
    return select
  return decorate


def register(name: str, needs: Optional[str], needs_key: bool = False):
  """Decorator adding a new strategy under `name` (specified in `ntxr.specs` as it
  registers), its selector (rows, pool, key) -> Negatives reading the rows of the score
  matrix `needs` ("cross", "audio", "text" or None) and, with needs_key, a PRNG key; a
  taken name is refused."""
  spec = specs.Strategy(name, needs, needs_key=needs_key)
  def decorate(select: Selector) -> Selector:
    specs.add(spec)
    return _selects(spec)(select)
  return decorate


def _specified(name: str):
  """Decorator registering the selector of the strategy `name` specified in `ntxr.specs`."""
  if name not in specs.STRATEGIES:
    raise ValueError(f"strategy {name!r} is not specified in ntxr/specs.py")
  return _selects(specs.STRATEGIES[name])


def masked_argmax(values: Array, pool: Array) -> Array:
  """Row-wise argmax over the pool: [n, G], [n, G] bool -> [n] int32, -1 if pool empty.

  Ties go to the lowest index.
  """
  index = jnp.argmax(jnp.where(pool, values, -jnp.inf), axis=1).astype(jnp.int32)
  return jnp.where(pool.any(axis=1), index, -1)


@_specified("full_batch")
def _full_batch(_, pool, __):
  """Every member of the pool; the anchor's hinge is averaged over them."""
  every = jnp.broadcast_to(jnp.arange(pool.shape[1], dtype=jnp.int32), pool.shape)
  return Negatives(every, every, pool)


@_specified("random")
def _random(rows, pool, key):
  """Uniform over the pool, audio and text drawn independently: anchor i's draws come from
  the key folded with i, whichever device holds it, [n, G] and never [G, G]."""
  audio_key, text_key = jax.random.split(key)
  count = pool.shape[1]
  draws = lambda key: jax.vmap(lambda anchor: jax.random.uniform(
      jax.random.fold_in(key, anchor), (count,)))(rows.anchors)
  return _one_each(masked_argmax(draws(audio_key), pool),
                   masked_argmax(draws(text_key), pool))


@_specified("semihard_cross")
def _semihard_cross(rows, pool, _):
  """Negative whose cross score is closest to the positive's, either side."""
  positive = rows.positive[:, None]
  return _one_each(masked_argmax(-jnp.abs(rows.by_text - positive), pool),
                   masked_argmax(-jnp.abs(rows.by_audio - positive), pool))


@_specified("hard_cross")
def _hard_cross(rows, pool, _):
  """Negative with the highest cross score."""
  return _one_each(masked_argmax(rows.by_text, pool), masked_argmax(rows.by_audio, pool))


def _same_for_both(sign: float) -> Selector:
  """Selector taking one j per anchor from a within-modality matrix, used both ways."""
  def select(rows, pool, _):
    index = masked_argmax(sign * rows.by_audio, pool)
    return _one_each(index, index)
  return select


_specified("easy_text")(_same_for_both(-1.0))
_specified("hard_text")(_same_for_both(1.0))
_specified("easy_audio")(_same_for_both(-1.0))
_specified("hard_audio")(_same_for_both(1.0))
specs.check_registered(specs.STRATEGIES, STRATEGIES)


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


def negative_pool(audio_ids: Array) -> Array:
  """pool[i, j] = audio_ids[i] != audio_ids[j]: [N] -> [N, N] bool."""
  return audio_ids[:, None] != audio_ids[None, :]


def select_negatives(s_cross: Optional[Array], audio_ids: Array, *, strategy: str,
                     key: Optional[Array] = None, s_audio: Optional[Array] = None,
                     s_text: Optional[Array] = None,
                     pool: Optional[Array] = None) -> Negatives:
  """Each anchor's negatives under `strategy`, chosen without gradient.

  Args:
    s_cross: [N, N] float, s_cross[a, t] = score(audio a, text t); may be None for
      strategies that do not read it.
    audio_ids: [N] int, equal exactly when two captions belong to the same clip.
    strategy: a name in STRATEGIES.
    key: PRNG key, required by "random".
    s_audio: [N, N] float audio-audio scores, for easy_audio / hard_audio.
    s_text: [N, N] float text-text scores, for easy_text / hard_text.
    pool: [N, N] bool, anchor i may take j (default: negative_pool(audio_ids)); a
      false-negative filter passes a smaller one.

  Returns:
    Negatives: [N, K] indices and validity; an empty pool gives index -1, not valid.

  Example:
    >>> s = jnp.array([[.9, .2, .4], [.1, .8, .3], [.5, .6, .7]])
    >>> chosen = select_negatives(s, jnp.array([0, 1, 2]), strategy="hard_cross")
    >>> chosen.audio[:, 0], chosen.text[:, 0]
    (Array([2, 2, 0], dtype=int32), Array([2, 2, 1], dtype=int32))
  """
  spec = get_strategy(strategy)
  n = _check_ids(audio_ids)
  matrices = {"cross": s_cross, "audio": s_audio, "text": s_text}
  for name, matrix in matrices.items():
    _check_matrix(f"s_{name}", matrix, n, required=spec.needs == name)
  if spec.needs_key and key is None:
    raise ValueError(f"strategy {strategy!r} draws at random: pass key=")
  if pool is None:
    pool = negative_pool(audio_ids)
  elif pool.shape != (n, n) or pool.dtype != jnp.bool_:
    raise ValueError(f"pool must be bool {(n, n)}, got {pool.dtype} {pool.shape}")
  return spec.select(whole_rows(matrices.get(spec.needs), spec.needs == "cross", n), pool, key)


def whole_rows(matrix: Optional[Array], cross: bool, n: int) -> Rows:
  """The Rows of a whole [n, n] matrix (None: none), without gradient; `cross`: it is
  s_cross (else a symmetric within-modality matrix)."""
  anchors = jnp.arange(n, dtype=jnp.int32)
  if matrix is None:
    return Rows(None, None, None, anchors)
  matrix = jax.lax.stop_gradient(matrix)
  if not cross:
    return Rows(matrix, matrix, None, anchors)
  return Rows(matrix, matrix.T, jnp.diagonal(matrix), anchors)


def masked_mean(x: Array, mask: Array, axis=None) -> Array:
  """The mean of x over the entries where mask [broadcastable to x] is True, along axis
  (None: all); 0 where there are none.

  Example:
    >>> float(masked_mean(jnp.array([1., 2., 9.]), jnp.array([True, True, False])))
    1.5
  """
  mask = jnp.broadcast_to(mask, x.shape)
  return jnp.sum(jnp.where(mask, x, 0), axis=axis) / jnp.maximum(mask.sum(axis=axis), 1)


class LossTerms(NamedTuple):
  """What an objective's loss saw, for diagnostics: positive [N]; negative [N, 2] (the audio
  negatives' and the text negatives' mean score); valid [N] (non-empty pool); weights
  [2, N, C] over the C candidates (N, or N + M with a memory) (each caption anchor's
  weight on clips, each audio anchor's on captions: how much each negative counts, rows
  summing to 1 over the negatives, 0 without any)."""
  positive: Array
  negative: Array
  valid: Array
  weights: Array


def negative_weights(chosen: Negatives, candidates: Optional[int] = None) -> Array:
  """Negatives as weights [2, n, G] (G candidates, default n): each valid chosen index
  gets 1 / (valid count)."""
  n = chosen.audio.shape[0]
  share = jnp.where(chosen.valid, 1.0 / jnp.maximum(chosen.valid.sum(1, keepdims=True), 1), 0)
  rows = jnp.broadcast_to(jnp.arange(n)[:, None], chosen.audio.shape)
  scatter = lambda columns: jnp.zeros((n, candidates or n)).at[rows, columns].add(share)
  return jnp.stack([scatter(chosen.audio), scatter(chosen.text)])


def triplet_from_scores(positive: Array, audio_negative: Array, text_negative: Array,
                        chosen: Negatives, margin: float, candidates: Optional[int] = None,
                        mean=jnp.mean) -> Tuple[Array, LossTerms]:
  """The triplet loss and its LossTerms from the anchors' scores with gradient: positive
  [n], the chosen negatives' audio_negative and text_negative [n, K]. Each anchor's hinge
  is averaged over its valid negatives, the two directions added; mean([n]) averages the
  anchors (over a sharded batch, every device's)."""
  average = lambda x: masked_mean(x, chosen.valid, axis=1)
  hinge = lambda negative: average(jax.nn.relu(negative - positive[:, None] + margin))
  loss = mean(hinge(audio_negative) + hinge(text_negative))
  terms = LossTerms(positive, jnp.stack([average(audio_negative), average(text_negative)], 1),
                    chosen.valid.any(axis=1), negative_weights(chosen, candidates))
  return loss, terms


def _selected_scores(scorer: scores.Scorer, audio: Array, text: Array,
                     audio_mask: Optional[Array], text_mask: Optional[Array],
                     chosen: Negatives) -> tuple[Array, Array, Array]:
  """(positive [N], audio negatives [N, K], text negatives [N, K]) scored with gradient.

  One negative each: only the 3N chosen pairs are scored, each audio against its own
  caption and its text negative in one product, the audio tensor gathered once. More:
  the N x N cross matrix once, and the chosen entries read from it.
  """
  n, k = chosen.audio.shape
  if k > 1:
    s_cross = scorer.matrix(audio, text, audio_mask, text_mask)
    return (jnp.diagonal(s_cross), jnp.take_along_axis(s_cross.T, chosen.audio, axis=1),
            jnp.take_along_axis(s_cross, chosen.text, axis=1))
  take = lambda x, rows: None if x is None else x[rows]
  own_and_negative = lambda x: None if x is None else jnp.concatenate(
      [x[:, None], x[chosen.text]], axis=1)
  own, text_negative = jnp.split(scorer.paired(
      audio, own_and_negative(text), audio_mask, own_and_negative(text_mask)), [1], axis=1)
  audio_rows = chosen.audio[:, 0]
  audio_negative = scorer.paired(audio[audio_rows], text, take(audio_mask, audio_rows),
                                 text_mask)
  return own[:, 0], audio_negative.reshape(n, 1), text_negative


def triplet_loss_and_terms(audio: Array, text: Array, audio_ids: Array, *,
                           strategy: str, margin: float = 0.5,
                           key: Optional[Array] = None,
                           audio_mask: Optional[Array] = None,
                           text_mask: Optional[Array] = None,
                           score: str = "alignment",
                           pool: Optional[Array] = None) -> Tuple[Array, LossTerms]:
  """The bidirectional triplet loss from embeddings, computing only what the strategy needs.

  Negatives are chosen by `select_negatives` from the one matrix the strategy reads
  (the N x N cross matrix for the cross strategies, a symmetric within-modality matrix
  for the audio and text ones, none for random and full_batch), computed without
  gradient; then only the chosen pairs are scored with gradient. Each anchor's hinge is
  averaged over its valid negatives, the two directions added, and the anchors averaged.

  Args:
    audio: [N, T, E] float frame embeddings; text: [N, W, E] float word embeddings.
    audio_ids: [N] int clip ids.
    strategy: a name in STRATEGIES; margin: hinge margin; key: PRNG key for "random".
    audio_mask: [N, T] bool; text_mask: [N, W] bool (None: all valid).
    score: "alignment" (the paper's) or "pooled".
    pool: [N, N] bool each anchor's candidates (default: every other clip).

  Returns:
    (scalar loss, LossTerms); anchors with an empty pool add 0.

  Example:
    >>> clips = jnp.eye(2)[:, None, :]  # two one-frame clips, two one-word captions
    >>> captions = jnp.array([[[.8, .6]], [[.6, .8]]])  # s_cross = [[.8, .6], [.6, .8]]
    >>> loss, terms = triplet_loss_and_terms(clips, captions, jnp.array([0, 1]),
    ...                                      strategy="hard_cross")
    >>> round(float(loss), 4), round(float(terms.negative[0, 0]), 4)  # 2 x (.6 - .8 + .5)
    (0.6, 0.6)
  """
  scorer = scores.get_scorer(score)
  n = _check_ids(audio_ids)
  if audio.ndim != 3 or text.ndim != 3 or audio.shape[0] != n or text.shape[0] != n:
    raise ValueError(f"audio [N, T, E] and text [N, W, E] must match audio_ids [{n}]; "
                     f"got {audio.shape} and {text.shape}")
  frozen_audio, frozen_text = jax.lax.stop_gradient((audio, text))
  needs = get_strategy(strategy).needs
  compute = {"cross": lambda: scorer.matrix(frozen_audio, frozen_text, audio_mask, text_mask),
             "audio": lambda: scorer.symmetric(frozen_audio, audio_mask),
             "text": lambda: scorer.symmetric(frozen_text, text_mask)}
  matrices = {f"s_{needs}": compute[needs]()} if needs else {}
  chosen = select_negatives(matrices.pop("s_cross", None), audio_ids, strategy=strategy,
                            key=key, pool=pool, **matrices)
  return triplet_from_scores(*_selected_scores(scorer, audio, text, audio_mask, text_mask,
                                              chosen), chosen, margin)


def triplet_loss(audio: Array, text: Array, audio_ids: Array, *, strategy: str,
                 margin: float = 0.5, key: Optional[Array] = None,
                 audio_mask: Optional[Array] = None, text_mask: Optional[Array] = None,
                 score: str = "alignment", pool: Optional[Array] = None) -> Array:
  """The scalar loss of `triplet_loss_and_terms` (the same arguments)."""
  return triplet_loss_and_terms(audio, text, audio_ids, strategy=strategy, margin=margin,
                                key=key, audio_mask=audio_mask, text_mask=text_mask,
                                score=score, pool=pool)[0]
