"""Contrastive objectives over the in-batch cross score matrix (JAX only).

Notation: s[a, t] = score(audio a, text t) [N, N]; P[a, t] = audio_ids[a] ==
audio_ids[t], the diagonal included; z = s / temperature. Audio anchor a is scored
over its row, caption anchor t over its column; an anchor's candidates are its
positives (P) and the negatives in its pool (by default every caption or clip of
another clip; the false-negative filter may remove some). Padding rows (valid False)
are neither anchors nor candidates, and an anchor whose pool is empty adds 0. Each
loss averages over the valid anchors:

- "infonce": l(t) = -(1/|P_t|) sum_{a in P_t} log softmax(z[:, t])[a], the same over
  rows for audio anchors; loss = (mean_t l_t2a + mean_a l_a2t) / 2.
- "siglip": -(1/N) sum_{a,t} log sigmoid(y[a, t] (z[a, t] + bias)), y = +1 on P and -1
  on the other candidates.
- "hn_nce": infonce with each negative j weighted inside the softmax by
  w_j = |neg| exp(beta z_j) / sum_k exp(beta z_k) (no gradient); beta = 0 is infonce.
- "soft": cross-entropy of the softmaxes with targets from `relevance` [N, N] >= P,
  normalised over each anchor's candidates; relevance = P is infonce.

The triplet objective with a negative-sampling strategy lives in ntxr.sampling.
"""

import dataclasses
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from ntxr import sampling

Array = jax.Array


class Pools(NamedTuple):
  """Each anchor's negatives: text [N, N] bool, pool of caption anchor t over clips a
  (pools.text[t, a]); audio [N, N] bool, pool of audio anchor a over captions t."""
  text: Array
  audio: Array


def default_pools(audio_ids: Array, valid: Optional[Array] = None) -> Pools:
  """Every candidate of another clip, padding rows (valid False) left out: [N] -> Pools."""
  other = sampling.negative_pool(audio_ids)
  if valid is not None:
    other = other & valid[:, None] & valid[None, :]
  return Pools(other, other)


@dataclasses.dataclass(frozen=True)
class Objective:
  """A way of scoring the whole pool.

  Attributes:
    name: registry name.
    loss: (z, positives, pools, valid, *, bias, beta, relevance) -> scalar.
    negative_logits: (z, pool, *, bias, beta) -> [N, N], rows anchors: the log of each
      negative's share of the gradient up to a row constant (softmax weight, or siglip's
      sigmoid), for measuring where the loss puts its weight.
  """
  name: str
  loss: Callable[..., Array]
  negative_logits: Callable[..., Array]


OBJECTIVES: dict[str, Objective] = {}


def register(name: str, negative_logits: Callable[..., Array] = lambda z, pool, **_: z):
  """Decorator adding an objective to OBJECTIVES under `name`; a taken name is refused."""
  def decorate(loss):
    if name in OBJECTIVES:
      raise ValueError(f"an objective named {name!r} is registered already")
    OBJECTIVES[name] = Objective(name, loss, negative_logits)
    return loss
  return decorate


def get_objective(name: str) -> Objective:
  if name not in OBJECTIVES:
    raise ValueError(f"unknown objective {name!r}; choose from {sorted(OBJECTIVES)} or "
                     "'triplet' (with a --strategy)")
  return OBJECTIVES[name]


def _anchor_mean(per_anchor: Array, anchors: Array) -> Array:
  """Mean of per_anchor [N] over anchors [N] bool (0 if there are none)."""
  return jnp.sum(jnp.where(anchors, per_anchor, 0)) / jnp.maximum(anchors.sum(), 1)


def _cross_entropy(z: Array, targets: Array, log_weights: Array, candidates: Array,
                   anchors: Array) -> Array:
  """Mean over anchor rows of -sum_j targets_ij log(w_ij e^z_ij / sum_k w_ik e^z_ik),
  the softmax over candidates [N, N] bool; targets rows sum to 1 (rows: anchors)."""
  some = candidates.any(axis=1, keepdims=True)  # rows without any stay finite
  logits = jnp.where(candidates, z + log_weights, jnp.where(some, -jnp.inf, 0.0))
  log_softmax = z - jax.nn.logsumexp(logits, axis=1, keepdims=True)
  per_anchor = -jnp.sum(jnp.where(targets > 0, targets * log_softmax, 0), axis=1)
  return _anchor_mean(per_anchor, anchors)


def _normalised(relevance: Array, candidates: Array) -> Array:
  """relevance [N, N] >= 0 restricted to each row's candidates, rows summing to 1."""
  kept = jnp.where(candidates, relevance, 0)
  return kept / jnp.maximum(kept.sum(axis=1, keepdims=True), 1e-12)


def hard_negative_log_weights(z: Array, pool: Array, beta: float) -> Array:
  """log w [N, N]: 0 off the pool, log(|pool| softmax_pool(beta z)) on it (no gradient)."""
  z = jax.lax.stop_gradient(z)
  logits = jnp.where(pool, beta * z, -jnp.inf)
  log_share = logits - jax.nn.logsumexp(logits, axis=1, keepdims=True)
  count = jnp.maximum(pool.sum(axis=1, keepdims=True), 1)
  return jnp.where(pool, log_share + jnp.log(count), 0.0)


def _softmax_objective(z: Array, targets: Array, positives: Array, pools: Pools,
                       valid: Array, log_weights=lambda z, pool: jnp.zeros_like(z)) -> Array:
  """(audio anchors' rows + caption anchors' columns) / 2 of the cross-entropy between
  targets [N, N] (normalised over each anchor's candidates) and the softmax of z with
  log_weights(z, pool) added inside it; an anchor's candidates are its positives and
  its pool, and anchors are the valid rows with a pool."""
  def direction(z, targets, positives, pool):
    candidates = positives | pool
    return _cross_entropy(z, _normalised(targets, candidates), log_weights(z, pool),
                          candidates, valid & pool.any(axis=1))
  return (direction(z, targets, positives, pools.audio)
          + direction(z.T, targets.T, positives.T, pools.text)) / 2


@register("infonce")
def _infonce(z, positives, pools, valid, **_):
  return _softmax_objective(z, positives.astype(z.dtype), positives, pools, valid)


@register("hn_nce", negative_logits=lambda z, pool, *, beta, **_: (
    z + hard_negative_log_weights(z, pool, beta)))
def _hn_nce(z, positives, pools, valid, *, beta, **_):
  return _softmax_objective(z, positives.astype(z.dtype), positives, pools, valid,
                            lambda z, pool: hard_negative_log_weights(z, pool, beta))


@register("soft")
def _soft(z, positives, pools, valid, *, relevance, **_):
  if relevance is None:
    raise ValueError("objective 'soft' needs relevance= [N, N]")
  return _softmax_objective(z, relevance, positives, pools, valid)


@register("siglip", negative_logits=lambda z, pool, *, bias, **_: jax.nn.log_sigmoid(z + bias))
def _siglip(z, positives, pools, valid, *, bias, **_):
  pairs = positives | (pools.audio & pools.text.T)
  pairs = pairs & valid[:, None] & valid[None, :]
  signs = jnp.where(positives, 1.0, -1.0)
  log_likelihood = jnp.where(pairs, jax.nn.log_sigmoid(signs * (z + bias)), 0)
  return -jnp.sum(log_likelihood) / jnp.maximum(valid.sum(), 1)


def contrastive_loss(s_cross: Array, audio_ids: Array, *, objective: str,
                     temperature: float = 0.05, bias: float = 0.0, beta: float = 0.0,
                     relevance: Optional[Array] = None, pools: Optional[Pools] = None,
                     valid: Optional[Array] = None) -> Array:
  """The scalar loss of `objective` on one batch.

  Args:
    s_cross: [N, N] float, s_cross[a, t] = score(audio a, text t).
    audio_ids: [N] int, equal exactly when two captions belong to the same clip.
    objective: a name in OBJECTIVES.
    temperature: z = s_cross / temperature (a traced value is fine: it may be learnt).
    bias: siglip's logit bias; beta: hn_nce's hardness (0: infonce).
    relevance: [N, N] float >= 0, soft's targets (at least 1 where P).
    pools: the anchors' negatives (default: default_pools(audio_ids, valid)).
    valid: [N] bool, False for padding rows (default: all valid).

  Example:
    >>> s = jnp.array([[1., 0.], [0., 1.]])
    >>> round(float(contrastive_loss(s, jnp.array([0, 1]), objective="infonce",
    ...                              temperature=1.0)), 4)  # -log(e / (e + 1))
    0.3133
  """
  spec = get_objective(objective)
  if s_cross.ndim != 2 or s_cross.shape[0] != s_cross.shape[1]:
    raise ValueError(f"s_cross must be [N, N], got {s_cross.shape}")
  n = s_cross.shape[0]
  if audio_ids.shape != (n,) or not jnp.issubdtype(audio_ids.dtype, jnp.integer):
    raise ValueError(f"audio_ids must be an integer vector [{n}], got {audio_ids.dtype} "
                     f"{audio_ids.shape}")
  if relevance is not None and relevance.shape != (n, n):
    raise ValueError(f"relevance must be [{n}, {n}], got {relevance.shape}")
  valid = jnp.ones(n, bool) if valid is None else valid
  pools = default_pools(audio_ids, valid) if pools is None else pools
  positives = (audio_ids[:, None] == audio_ids[None, :]) & valid[:, None] & valid[None, :]
  z = s_cross.astype(jnp.float32) / temperature
  return spec.loss(z, positives, pools, valid, bias=bias, beta=beta, relevance=relevance)


# What a run is named by: a strategy (of the triplet objective) or another objective.
SETTINGS = (*sampling.STRATEGIES, *OBJECTIVES)

SIGLIP_INITIAL = {"log_inverse_temperature": float(np.log(10.0)), "bias": -10.0}


def initial_parameters(objective: str) -> dict:
  """The objective's learnt scalars for a train state's params: siglip learns its
  inverse temperature (from 10) and bias (from -10); the others learn nothing."""
  if objective == "siglip":
    return {"objective": {k: jnp.asarray(v, jnp.float32) for k, v in SIGLIP_INITIAL.items()}}
  return {}


def _weights(logits: Array, pool: Array) -> Array:
  """Softmax of logits [N, N] over each row's pool; 0 for rows without one."""
  logits = jnp.where(pool, logits, -jnp.inf)
  peak = jnp.max(jnp.where(pool.any(axis=1, keepdims=True), logits, 0), axis=1, keepdims=True)
  exp = jnp.where(pool, jnp.exp(logits - peak), 0)
  return exp / jnp.maximum(exp.sum(axis=1, keepdims=True), 1e-30)


def objective_loss_and_terms(s_cross: Array, audio_ids: Array, learnt: dict, *,
                             objective: str, temperature: float, beta: float,
                             relevance: Optional[Array] = None,
                             pools: Optional[Pools] = None) -> tuple:
  """(loss, sampling.TripletTerms) of a training batch. learnt: the objective's
  parameters (initial_parameters), which replace temperature and bias where present.
  The terms hold the positives, each anchor's mean pool score, and the weights each
  anchor's negatives carry (Objective.negative_logits)."""
  if "log_inverse_temperature" in learnt:
    temperature = jnp.exp(-learnt["log_inverse_temperature"])
  bias = learnt.get("bias", 0.0)
  pools = default_pools(audio_ids) if pools is None else pools
  loss = contrastive_loss(s_cross, audio_ids, objective=objective, temperature=temperature,
                          bias=bias, beta=beta, relevance=relevance, pools=pools)
  logits = get_objective(objective).negative_logits
  s = jax.lax.stop_gradient(s_cross)
  z = s / jax.lax.stop_gradient(temperature)
  hyper = dict(beta=beta, bias=jax.lax.stop_gradient(bias))
  weights = jnp.stack([_weights(logits(z.T, pools.text, **hyper), pools.text),
                       _weights(logits(z, pools.audio, **hyper), pools.audio)])
  mean = lambda scores, pool: (jnp.sum(jnp.where(pool, scores, 0), axis=1)
                               / jnp.maximum(pool.sum(axis=1), 1))
  negative = jnp.stack([mean(s.T, pools.text), mean(s, pools.audio)], axis=1)
  valid = pools.text.any(axis=1) | pools.audio.any(axis=1)
  return loss, sampling.TripletTerms(jnp.diagonal(s), negative, valid, weights)
